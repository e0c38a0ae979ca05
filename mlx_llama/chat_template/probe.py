"""What a template writes around the messages, read off probe renderings: the generation prompt,
the end of an assistant turn (for the stop set) and its fixed markers (for `looks_templated`)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import ChatTemplateError

if TYPE_CHECKING:
    from .template import ChatTemplate

# probe contents: no whitespace (templates strip/trim), nothing a template would transform
_P_SYS, _P_U1, _P_A1, _P_U2 = "Mlxq7Sys", "Mlxq7UserOne", "Mlxq7Reply", "Mlxq7UserTwo"


def _between(text: str | None, a: str | None, b: str | None) -> str | None:
    """The text after `a` (or from the start) and before `b` (or to the end); None if absent."""
    if text is None:
        return None
    i = 0
    if a is not None:
        i = text.find(a)
        if i < 0:
            return None
        i += len(a)
    j = len(text)
    if b is not None:
        j = text.find(b, i)
        if j < 0:
            return None
    return text[i:j]


def analyze(tmpl: ChatTemplate) -> dict:
    """Render probe conversations and read off the texts the template puts around messages."""

    def render(msgs, gen):
        try:
            return tmpl.render([{"role": r, "content": c} for r, c in msgs], add_generation_prompt=gen)
        except ChatTemplateError:
            return None

    u = [("user", _P_U1)]
    ua = u + [("assistant", _P_A1)]
    uau = ua + [("user", _P_U2)]
    r_u, r_u_gen = render(u, False), render(u, True)
    r_ua, r_uau = render(ua, False), render(uau, False)
    r_su = render([("system", _P_SYS)] + u, False)

    user_end = _between(r_u, _P_U1, None)
    asst_end = _between(r_ua, _P_A1, None)
    user_start = _between(r_uau, _P_A1, _P_U2)
    if asst_end is not None and user_start is not None and user_start.startswith(asst_end):
        user_start = user_start[len(asst_end):]
    asst_start = _between(r_ua, _P_U1, _P_A1)
    if asst_start is not None and user_end and asst_start.startswith(user_end):
        asst_start = asst_start[len(user_end):]
    sys_end = _between(r_su, _P_SYS, _P_U1)
    if sys_end is not None and user_start and sys_end.endswith(user_start):
        sys_end = sys_end[: len(sys_end) - len(user_start)]
    gen = ""
    if r_u is not None and r_u_gen is not None and r_u_gen.startswith(r_u):
        gen = r_u_gen[len(r_u):]
    # (the text before the first user message is left out: it may hold a default system prompt)
    pieces = [user_start, user_end, asst_start, asst_end, gen, _between(r_su, None, _P_SYS), sys_end]

    specials = [t for t in (tmpl.bos_token, tmpl.eos_token) if t]
    return {
        "generation_prompt": gen,
        "end_of_turn": _chunks([asst_end], specials),
        "markers": _chunks(pieces, specials),
    }


def _chunks(pieces, specials) -> tuple[str, ...]:
    """Whitespace-separated chunks of the pieces, BOS/EOS texts split out, probe texts excluded;
    plain words (no punctuation) and chunks shorter than 3 characters are dropped."""
    out: list[str] = []
    split = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")") \
        if specials else None
    for piece in pieces:
        if not piece:
            continue
        parts = [p for p in split.split(piece) if p] if split else [piece]
        for part in parts:
            for chunk in ([part] if part in specials else part.split()):
                if (len(chunk) >= 3 and not chunk.isalnum() and "Mlxq7" not in chunk and chunk not in out):
                    out.append(chunk)
    return tuple(out)
