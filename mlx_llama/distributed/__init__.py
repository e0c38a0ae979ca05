"""Models larger than one machine: pipeline and tensor parallelism over `mx.distributed`.

    mlx.launch -n 2 --backend ring -- mlx_llama generate --pipeline "Hello"

    from mlx_llama import distributed
    model, tokenizer = distributed.load("model.gguf", mode="tensor")   # every rank runs this

The modules, along the path of a run:

    world.py     joining the run (`connect`): the group, its backend, the collectives shared
    faults.py    ending cleanly: a lost rank, the launcher's SIGTERM, deadlines → one line on rank 0
    load.py      each rank reads its share of the GGUF file and builds its part of the model
    pipeline.py  consecutive layers per rank, activations passed on with send/recv
    tensor.py    heads, FFN units and vocabulary rows per rank, gathered (or summed) per block half
    base.py      the model interface both give to generation, chat and perplexity
"""

from .load import MODES, load
from .world import SameOnEveryRank, World, connect

__all__ = ["load", "connect", "World", "MODES", "SameOnEveryRank"]
