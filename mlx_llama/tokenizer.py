"""Tokenizer built from GGUF metadata alone, matching llama.cpp token for token.

Two vocabulary kinds are supported, named by `tokenizer.ggml.model`:

* ``gpt2``  – byte-level BPE. The text is cut into words by the regexes llama.cpp picks for
  `tokenizer.ggml.pre` (run on Python's `re` with llama.cpp's own Unicode tables), and each
  word is merged by a Hugging Face `tokenizers` BPE model.
* ``llama`` – SentencePiece BPE. Encoding runs on a `sentencepiece` processor built from a
  ModelProto assembled from the tokens, scores and token types.

What makes the result identical to llama.cpp rather than to the original HF/SP tokenizer is
the code around those engines, which follows `llama-vocab.cpp`: which tokens count as special
(including llama.cpp's text heuristics that promote e.g. `<|im_end|>` to a control token), how
special tokens are cut out of the text before the engine sees it, when BOS/EOS are added, how
pieces are rendered back to bytes and the clean-up llama.cpp applies when detokenizing.
"""

from __future__ import annotations

import codecs
import re
import struct
from dataclasses import dataclass
from itertools import chain

from .errors import GGUFError

__all__ = ["Tokenizer", "StreamingDetokenizer"]


class Attr:
    """llama.cpp's per-token attribute bits (`llama_token_attr`); only the ones we act on.

    Plain ints rather than an IntFlag: they are tested for every token of large vocabularies.
    """

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8


# `tokenizer.ggml.token_type` values (gguf's TokenType) → attribute.
_TYPE_TO_ATTR = {1: Attr.NORMAL, 2: Attr.UNKNOWN, 3: Attr.CONTROL, 4: Attr.USER_DEFINED, 5: Attr.UNUSED, 6: Attr.BYTE}

# --------------------------------------------------------------------------------------------
# Pre-tokenizers. Each entry lists the regexes llama.cpp applies one after the other: every
# regex splits each piece left by the previous one into matches and the text between them
# (HF's `Split(..., behavior="isolated")`). They are written with \p{L}, \p{N}, \p{M}, \p{P} and
# \s and run on Python's `re` once `_python_regex` has spelled those out as llama.cpp's own
# character tables (below); `re`'s backtracking semantics are those of llama.cpp's regexes.
# --------------------------------------------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Case-insensitive contractions are spelled out as llama.cpp does ((?i:...) is not portable).
_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Written with escapes: several of these characters have canonical equivalents that editors
# silently normalise, which would change (or break) the character ranges.
# llama.cpp runs regexes without \p{..} through std::wregex after replacing every non-ASCII
# whitespace character by \v, so literal whitespace inside these classes never matches
# there: the ranges leave out the whitespace in U+0800..U+4E00 (U+1680, U+2000..U+200A,
# U+2028, U+2029, U+202F, U+205F, U+3000), and the last range of _DEEPSEEK_PUNCT starts at U+3001.
_DEEPSEEK_CJK = (
    "[\u4e00-\u9fa5\u0800-\u167f\u1681-\u1fff\u200b-\u2027\u202a-\u202e\u2030-\u205e"
    "\u2060-\u2fff\u3001-\u4e00\uac00-\ud7ff]+"
)
_DEEPSEEK_LATIN = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102"
    "\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+"
)
_DEEPSEEK_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+"

# llama.cpp classifies code points with its own table (src/unicode-data.cpp, generated from
# Unicode 15.1), not with the regex engine's: Python's `re` follows the Unicode of the running
# Python, HF's Oniguruma a newer one (where e.g. U+A7CB is a letter that llama.cpp still treats
# as unassigned) and neither has \p{..} in `re` anyway. So every \p{L}, \p{N}, \p{M}, \p{P}
# in the regexes above is replaced by llama.cpp's code point ranges (hex, inclusive).
# Regenerate from llama.cpp's unicode-data.cpp: a category's ranges are the code points whose
# `unicode_ranges_flags` entry has its bit (NUMBER 0x2, LETTER 0x4, ACCENT_MARK 0x10,
# PUNCTUATION 0x20). tests/test_tokenizer_differential.py checks them against llama.cpp.
_UNICODE_RANGES = {
    "L": (
        "41-5a 61-7a aa b5 ba c0-d6 d8-f6 f8-2c1 2c6-2d1 2e0-2e4 2ec 2ee 370-374 376-377 37a-37d 37f "
        "386 388-38a 38c 38e-3a1 3a3-3f5 3f7-481 48a-52f 531-556 559 560-588 5d0-5ea 5ef-5f2 620-64a "
        "66e-66f 671-6d3 6d5 6e5-6e6 6ee-6ef 6fa-6fc 6ff 710 712-72f 74d-7a5 7b1 7ca-7ea 7f4-7f5 7fa "
        "800-815 81a 824 828 840-858 860-86a 870-887 889-88e 8a0-8c9 904-939 93d 950 958-961 971-980 "
        "985-98c 98f-990 993-9a8 9aa-9b0 9b2 9b6-9b9 9bd 9ce 9dc-9dd 9df-9e1 9f0-9f1 9fc a05-a0a "
        "a0f-a10 a13-a28 a2a-a30 a32-a33 a35-a36 a38-a39 a59-a5c a5e a72-a74 a85-a8d a8f-a91 a93-aa8 "
        "aaa-ab0 ab2-ab3 ab5-ab9 abd ad0 ae0-ae1 af9 b05-b0c b0f-b10 b13-b28 b2a-b30 b32-b33 b35-b39 "
        "b3d b5c-b5d b5f-b61 b71 b83 b85-b8a b8e-b90 b92-b95 b99-b9a b9c b9e-b9f ba3-ba4 ba8-baa "
        "bae-bb9 bd0 c05-c0c c0e-c10 c12-c28 c2a-c39 c3d c58-c5a c5d c60-c61 c80 c85-c8c c8e-c90 "
        "c92-ca8 caa-cb3 cb5-cb9 cbd cdd-cde ce0-ce1 cf1-cf2 d04-d0c d0e-d10 d12-d3a d3d d4e d54-d56 "
        "d5f-d61 d7a-d7f d85-d96 d9a-db1 db3-dbb dbd dc0-dc6 e01-e30 e32-e33 e40-e46 e81-e82 e84 "
        "e86-e8a e8c-ea3 ea5 ea7-eb0 eb2-eb3 ebd ec0-ec4 ec6 edc-edf f00 f40-f47 f49-f6c f88-f8c "
        "1000-102a 103f 1050-1055 105a-105d 1061 1065-1066 106e-1070 1075-1081 108e 10a0-10c5 10c7 10cd "
        "10d0-10fa 10fc-1248 124a-124d 1250-1256 1258 125a-125d 1260-1288 128a-128d 1290-12b0 12b2-12b5 "
        "12b8-12be 12c0 12c2-12c5 12c8-12d6 12d8-1310 1312-1315 1318-135a 1380-138f 13a0-13f5 13f8-13fd "
        "1401-166c 166f-167f 1681-169a 16a0-16ea 16f1-16f8 1700-1711 171f-1731 1740-1751 1760-176c "
        "176e-1770 1780-17b3 17d7 17dc 1820-1878 1880-1884 1887-18a8 18aa 18b0-18f5 1900-191e 1950-196d "
        "1970-1974 1980-19ab 19b0-19c9 1a00-1a16 1a20-1a54 1aa7 1b05-1b33 1b45-1b4c 1b83-1ba0 1bae-1baf "
        "1bba-1be5 1c00-1c23 1c4d-1c4f 1c5a-1c7d 1c80-1c88 1c90-1cba 1cbd-1cbf 1ce9-1cec 1cee-1cf3 "
        "1cf5-1cf6 1cfa 1d00-1dbf 1e00-1f15 1f18-1f1d 1f20-1f45 1f48-1f4d 1f50-1f57 1f59 1f5b 1f5d "
        "1f5f-1f7d 1f80-1fb4 1fb6-1fbc 1fbe 1fc2-1fc4 1fc6-1fcc 1fd0-1fd3 1fd6-1fdb 1fe0-1fec 1ff2-1ff4 "
        "1ff6-1ffc 2071 207f 2090-209c 2102 2107 210a-2113 2115 2119-211d 2124 2126 2128 212a-212d "
        "212f-2139 213c-213f 2145-2149 214e 2183-2184 2c00-2ce4 2ceb-2cee 2cf2-2cf3 2d00-2d25 2d27 2d2d "
        "2d30-2d67 2d6f 2d80-2d96 2da0-2da6 2da8-2dae 2db0-2db6 2db8-2dbe 2dc0-2dc6 2dc8-2dce 2dd0-2dd6 "
        "2dd8-2dde 2e2f 3005-3006 3031-3035 303b-303c 3041-3096 309d-309f 30a1-30fa 30fc-30ff 3105-312f "
        "3131-318e 31a0-31bf 31f0-31ff 3400-4dbf 4e00-a48c a4d0-a4fd a500-a60c a610-a61f a62a-a62b "
        "a640-a66e a67f-a69d a6a0-a6e5 a717-a71f a722-a788 a78b-a7ca a7d0-a7d1 a7d3 a7d5-a7d9 a7f2-a801 "
        "a803-a805 a807-a80a a80c-a822 a840-a873 a882-a8b3 a8f2-a8f7 a8fb a8fd-a8fe a90a-a925 a930-a946 "
        "a960-a97c a984-a9b2 a9cf a9e0-a9e4 a9e6-a9ef a9fa-a9fe aa00-aa28 aa40-aa42 aa44-aa4b aa60-aa76 "
        "aa7a aa7e-aaaf aab1 aab5-aab6 aab9-aabd aac0 aac2 aadb-aadd aae0-aaea aaf2-aaf4 ab01-ab06 "
        "ab09-ab0e ab11-ab16 ab20-ab26 ab28-ab2e ab30-ab5a ab5c-ab69 ab70-abe2 ac00-d7a3 d7b0-d7c6 "
        "d7cb-d7fb f900-fa6d fa70-fad9 fb00-fb06 fb13-fb17 fb1d fb1f-fb28 fb2a-fb36 fb38-fb3c fb3e "
        "fb40-fb41 fb43-fb44 fb46-fbb1 fbd3-fd3d fd50-fd8f fd92-fdc7 fdf0-fdfb fe70-fe74 fe76-fefc "
        "ff21-ff3a ff41-ff5a ff66-ffbe ffc2-ffc7 ffca-ffcf ffd2-ffd7 ffda-ffdc 10000-1000b 1000d-10026 "
        "10028-1003a 1003c-1003d 1003f-1004d 10050-1005d 10080-100fa 10280-1029c 102a0-102d0 "
        "10300-1031f 1032d-10340 10342-10349 10350-10375 10380-1039d 103a0-103c3 103c8-103cf "
        "10400-1049d 104b0-104d3 104d8-104fb 10500-10527 10530-10563 10570-1057a 1057c-1058a "
        "1058c-10592 10594-10595 10597-105a1 105a3-105b1 105b3-105b9 105bb-105bc 10600-10736 "
        "10740-10755 10760-10767 10780-10785 10787-107b0 107b2-107ba 10800-10805 10808 1080a-10835 "
        "10837-10838 1083c 1083f-10855 10860-10876 10880-1089e 108e0-108f2 108f4-108f5 10900-10915 "
        "10920-10939 10980-109b7 109be-109bf 10a00 10a10-10a13 10a15-10a17 10a19-10a35 10a60-10a7c "
        "10a80-10a9c 10ac0-10ac7 10ac9-10ae4 10b00-10b35 10b40-10b55 10b60-10b72 10b80-10b91 "
        "10c00-10c48 10c80-10cb2 10cc0-10cf2 10d00-10d23 10e80-10ea9 10eb0-10eb1 10f00-10f1c 10f27 "
        "10f30-10f45 10f70-10f81 10fb0-10fc4 10fe0-10ff6 11003-11037 11071-11072 11075 11083-110af "
        "110d0-110e8 11103-11126 11144 11147 11150-11172 11176 11183-111b2 111c1-111c4 111da 111dc "
        "11200-11211 11213-1122b 1123f-11240 11280-11286 11288 1128a-1128d 1128f-1129d 1129f-112a8 "
        "112b0-112de 11305-1130c 1130f-11310 11313-11328 1132a-11330 11332-11333 11335-11339 1133d "
        "11350 1135d-11361 11400-11434 11447-1144a 1145f-11461 11480-114af 114c4-114c5 114c7 "
        "11580-115ae 115d8-115db 11600-1162f 11644 11680-116aa 116b8 11700-1171a 11740-11746 "
        "11800-1182b 118a0-118df 118ff-11906 11909 1190c-11913 11915-11916 11918-1192f 1193f 11941 "
        "119a0-119a7 119aa-119d0 119e1 119e3 11a00 11a0b-11a32 11a3a 11a50 11a5c-11a89 11a9d "
        "11ab0-11af8 11c00-11c08 11c0a-11c2e 11c40 11c72-11c8f 11d00-11d06 11d08-11d09 11d0b-11d30 "
        "11d46 11d60-11d65 11d67-11d68 11d6a-11d89 11d98 11ee0-11ef2 11f02 11f04-11f10 11f12-11f33 "
        "11fb0 12000-12399 12480-12543 12f90-12ff0 13000-1342f 13441-13446 14400-14646 16800-16a38 "
        "16a40-16a5e 16a70-16abe 16ad0-16aed 16b00-16b2f 16b40-16b43 16b63-16b77 16b7d-16b8f "
        "16e40-16e7f 16f00-16f4a 16f50 16f93-16f9f 16fe0-16fe1 16fe3 17000-187f7 18800-18cd5 "
        "18d00-18d08 1aff0-1aff3 1aff5-1affb 1affd-1affe 1b000-1b122 1b132 1b150-1b152 1b155 "
        "1b164-1b167 1b170-1b2fb 1bc00-1bc6a 1bc70-1bc7c 1bc80-1bc88 1bc90-1bc99 1d400-1d454 "
        "1d456-1d49c 1d49e-1d49f 1d4a2 1d4a5-1d4a6 1d4a9-1d4ac 1d4ae-1d4b9 1d4bb 1d4bd-1d4c3 "
        "1d4c5-1d505 1d507-1d50a 1d50d-1d514 1d516-1d51c 1d51e-1d539 1d53b-1d53e 1d540-1d544 1d546 "
        "1d54a-1d550 1d552-1d6a5 1d6a8-1d6c0 1d6c2-1d6da 1d6dc-1d6fa 1d6fc-1d714 1d716-1d734 "
        "1d736-1d74e 1d750-1d76e 1d770-1d788 1d78a-1d7a8 1d7aa-1d7c2 1d7c4-1d7cb 1df00-1df1e "
        "1df25-1df2a 1e030-1e06d 1e100-1e12c 1e137-1e13d 1e14e 1e290-1e2ad 1e2c0-1e2eb 1e4d0-1e4eb "
        "1e7e0-1e7e6 1e7e8-1e7eb 1e7ed-1e7ee 1e7f0-1e7fe 1e800-1e8c4 1e900-1e943 1e94b 1ee00-1ee03 "
        "1ee05-1ee1f 1ee21-1ee22 1ee24 1ee27 1ee29-1ee32 1ee34-1ee37 1ee39 1ee3b 1ee42 1ee47 1ee49 "
        "1ee4b 1ee4d-1ee4f 1ee51-1ee52 1ee54 1ee57 1ee59 1ee5b 1ee5d 1ee5f 1ee61-1ee62 1ee64 "
        "1ee67-1ee6a 1ee6c-1ee72 1ee74-1ee77 1ee79-1ee7c 1ee7e 1ee80-1ee89 1ee8b-1ee9b 1eea1-1eea3 "
        "1eea5-1eea9 1eeab-1eebb 20000-2a6df 2a700-2b739 2b740-2b81d 2b820-2cea1 2ceb0-2ebe0 "
        "2ebf0-2ee5d 2f800-2fa1d 30000-3134a 31350-323af "
    ),
    "N": (
        "30-39 b2-b3 b9 bc-be 660-669 6f0-6f9 7c0-7c9 966-96f 9e6-9ef 9f4-9f9 a66-a6f ae6-aef b66-b6f "
        "b72-b77 be6-bf2 c66-c6f c78-c7e ce6-cef d58-d5e d66-d78 de6-def e50-e59 ed0-ed9 f20-f33 "
        "1040-1049 1090-1099 1369-137c 16ee-16f0 17e0-17e9 17f0-17f9 1810-1819 1946-194f 19d0-19da "
        "1a80-1a89 1a90-1a99 1b50-1b59 1bb0-1bb9 1c40-1c49 1c50-1c59 2070 2074-2079 2080-2089 2150-2182 "
        "2185-2189 2460-249b 24ea-24ff 2776-2793 2cfd 3007 3021-3029 3038-303a 3192-3195 3220-3229 "
        "3248-324f 3251-325f 3280-3289 32b1-32bf a620-a629 a6e6-a6ef a830-a835 a8d0-a8d9 a900-a909 "
        "a9d0-a9d9 a9f0-a9f9 aa50-aa59 abf0-abf9 ff10-ff19 10107-10133 10140-10178 1018a-1018b "
        "102e1-102fb 10320-10323 10341 1034a 103d1-103d5 104a0-104a9 10858-1085f 10879-1087f "
        "108a7-108af 108fb-108ff 10916-1091b 109bc-109bd 109c0-109cf 109d2-109ff 10a40-10a48 "
        "10a7d-10a7e 10a9d-10a9f 10aeb-10aef 10b58-10b5f 10b78-10b7f 10ba9-10baf 10cfa-10cff "
        "10d30-10d39 10e60-10e7e 10f1d-10f26 10f51-10f54 10fc5-10fcb 11052-1106f 110f0-110f9 "
        "11136-1113f 111d0-111d9 111e1-111f4 112f0-112f9 11450-11459 114d0-114d9 11650-11659 "
        "116c0-116c9 11730-1173b 118e0-118f2 11950-11959 11c50-11c6c 11d50-11d59 11da0-11da9 "
        "11f50-11f59 11fc0-11fd4 12400-1246e 16a60-16a69 16ac0-16ac9 16b50-16b59 16b5b-16b61 "
        "16e80-16e96 1d2c0-1d2d3 1d2e0-1d2f3 1d360-1d378 1d7ce-1d7ff 1e140-1e149 1e2f0-1e2f9 "
        "1e4f0-1e4f9 1e8c7-1e8cf 1e950-1e959 1ec71-1ecab 1ecad-1ecaf 1ecb1-1ecb4 1ed01-1ed2d "
        "1ed2f-1ed3d 1f100-1f10c 1fbf0-1fbf9 "
    ),
    "M": (
        "300-36f 483-489 591-5bd 5bf 5c1-5c2 5c4-5c5 5c7 610-61a 64b-65f 670 6d6-6dc 6df-6e4 6e7-6e8 "
        "6ea-6ed 711 730-74a 7a6-7b0 7eb-7f3 7fd 816-819 81b-823 825-827 829-82d 859-85b 898-89f "
        "8ca-8e1 8e3-903 93a-93c 93e-94f 951-957 962-963 981-983 9bc 9be-9c4 9c7-9c8 9cb-9cd 9d7 "
        "9e2-9e3 9fe a01-a03 a3c a3e-a42 a47-a48 a4b-a4d a51 a70-a71 a75 a81-a83 abc abe-ac5 ac7-ac9 "
        "acb-acd ae2-ae3 afa-aff b01-b03 b3c b3e-b44 b47-b48 b4b-b4d b55-b57 b62-b63 b82 bbe-bc2 "
        "bc6-bc8 bca-bcd bd7 c00-c04 c3c c3e-c44 c46-c48 c4a-c4d c55-c56 c62-c63 c81-c83 cbc cbe-cc4 "
        "cc6-cc8 cca-ccd cd5-cd6 ce2-ce3 cf3 d00-d03 d3b-d3c d3e-d44 d46-d48 d4a-d4d d57 d62-d63 "
        "d81-d83 dca dcf-dd4 dd6 dd8-ddf df2-df3 e31 e34-e3a e47-e4e eb1 eb4-ebc ec8-ece f18-f19 f35 "
        "f37 f39 f3e-f3f f71-f84 f86-f87 f8d-f97 f99-fbc fc6 102b-103e 1056-1059 105e-1060 1062-1064 "
        "1067-106d 1071-1074 1082-108d 108f 109a-109d 135d-135f 1712-1715 1732-1734 1752-1753 1772-1773 "
        "17b4-17d3 17dd 180b-180d 180f 1885-1886 18a9 1920-192b 1930-193b 1a17-1a1b 1a55-1a5e 1a60-1a7c "
        "1a7f 1ab0-1ace 1b00-1b04 1b34-1b44 1b6b-1b73 1b80-1b82 1ba1-1bad 1be6-1bf3 1c24-1c37 1cd0-1cd2 "
        "1cd4-1ce8 1ced 1cf4 1cf7-1cf9 1dc0-1dff 20d0-20f0 2cef-2cf1 2d7f 2de0-2dff 302a-302f 3099-309a "
        "a66f-a672 a674-a67d a69e-a69f a6f0-a6f1 a802 a806 a80b a823-a827 a82c a880-a881 a8b4-a8c5 "
        "a8e0-a8f1 a8ff a926-a92d a947-a953 a980-a983 a9b3-a9c0 a9e5 aa29-aa36 aa43 aa4c-aa4d aa7b-aa7d "
        "aab0 aab2-aab4 aab7-aab8 aabe-aabf aac1 aaeb-aaef aaf5-aaf6 abe3-abea abec-abed fb1e fe00-fe0f "
        "fe20-fe2f 101fd 102e0 10376-1037a 10a01-10a03 10a05-10a06 10a0c-10a0f 10a38-10a3a 10a3f "
        "10ae5-10ae6 10d24-10d27 10eab-10eac 10efd-10eff 10f46-10f50 10f82-10f85 11000-11002 "
        "11038-11046 11070 11073-11074 1107f-11082 110b0-110ba 110c2 11100-11102 11127-11134 "
        "11145-11146 11173 11180-11182 111b3-111c0 111c9-111cc 111ce-111cf 1122c-11237 1123e 11241 "
        "112df-112ea 11300-11303 1133b-1133c 1133e-11344 11347-11348 1134b-1134d 11357 11362-11363 "
        "11366-1136c 11370-11374 11435-11446 1145e 114b0-114c3 115af-115b5 115b8-115c0 115dc-115dd "
        "11630-11640 116ab-116b7 1171d-1172b 1182c-1183a 11930-11935 11937-11938 1193b-1193e 11940 "
        "11942-11943 119d1-119d7 119da-119e0 119e4 11a01-11a0a 11a33-11a39 11a3b-11a3e 11a47 "
        "11a51-11a5b 11a8a-11a99 11c2f-11c36 11c38-11c3f 11c92-11ca7 11ca9-11cb6 11d31-11d36 11d3a "
        "11d3c-11d3d 11d3f-11d45 11d47 11d8a-11d8e 11d90-11d91 11d93-11d97 11ef3-11ef6 11f00-11f01 "
        "11f03 11f34-11f3a 11f3e-11f42 13440 13447-13455 16af0-16af4 16b30-16b36 16f4f 16f51-16f87 "
        "16f8f-16f92 16fe4 16ff0-16ff1 1bc9d-1bc9e 1cf00-1cf2d 1cf30-1cf46 1d165-1d169 1d16d-1d172 "
        "1d17b-1d182 1d185-1d18b 1d1aa-1d1ad 1d242-1d244 1da00-1da36 1da3b-1da6c 1da75 1da84 "
        "1da9b-1da9f 1daa1-1daaf 1e000-1e006 1e008-1e018 1e01b-1e021 1e023-1e024 1e026-1e02a 1e08f "
        "1e130-1e136 1e2ae 1e2ec-1e2ef 1e4ec-1e4ef 1e8d0-1e8d6 1e944-1e94a e0100-e01ef "
    ),
    "P": (
        "21-23 25-2a 2c-2f 3a-3b 3f-40 5b-5d 5f 7b 7d a1 a7 ab b6-b7 bb bf 37e 387 55a-55f 589-58a 5be "
        "5c0 5c3 5c6 5f3-5f4 609-60a 60c-60d 61b 61d-61f 66a-66d 6d4 700-70d 7f7-7f9 830-83e 85e "
        "964-965 970 9fd a76 af0 c77 c84 df4 e4f e5a-e5b f04-f12 f14 f3a-f3d f85 fd0-fd4 fd9-fda "
        "104a-104f 10fb 1360-1368 1400 166e 169b-169c 16eb-16ed 1735-1736 17d4-17d6 17d8-17da 1800-180a "
        "1944-1945 1a1e-1a1f 1aa0-1aa6 1aa8-1aad 1b5a-1b60 1b7d-1b7e 1bfc-1bff 1c3b-1c3f 1c7e-1c7f "
        "1cc0-1cc7 1cd3 2010-2027 2030-2043 2045-2051 2053-205e 207d-207e 208d-208e 2308-230b 2329-232a "
        "2768-2775 27c5-27c6 27e6-27ef 2983-2998 29d8-29db 29fc-29fd 2cf9-2cfc 2cfe-2cff 2d70 2e00-2e2e "
        "2e30-2e4f 2e52-2e5d 3001-3003 3008-3011 3014-301f 3030 303d 30a0 30fb a4fe-a4ff a60d-a60f a673 "
        "a67e a6f2-a6f7 a874-a877 a8ce-a8cf a8f8-a8fa a8fc a92e-a92f a95f a9c1-a9cd a9de-a9df aa5c-aa5f "
        "aade-aadf aaf0-aaf1 abeb fd3e-fd3f fe10-fe19 fe30-fe52 fe54-fe61 fe63 fe68 fe6a-fe6b ff01-ff03 "
        "ff05-ff0a ff0c-ff0f ff1a-ff1b ff1f-ff20 ff3b-ff3d ff3f ff5b ff5d ff5f-ff65 10100-10102 1039f "
        "103d0 1056f 10857 1091f 1093f 10a50-10a58 10a7f 10af0-10af6 10b39-10b3f 10b99-10b9c 10ead "
        "10f55-10f59 10f86-10f89 11047-1104d 110bb-110bc 110be-110c1 11140-11143 11174-11175 "
        "111c5-111c8 111cd 111db 111dd-111df 11238-1123d 112a9 1144b-1144f 1145a-1145b 1145d 114c6 "
        "115c1-115d7 11641-11643 11660-1166c 116b9 1173c-1173e 1183b 11944-11946 119e2 11a3f-11a46 "
        "11a9a-11a9c 11a9e-11aa2 11b00-11b09 11c41-11c45 11c70-11c71 11ef7-11ef8 11f43-11f4f 11fff "
        "12470-12474 12ff1-12ff2 16a6e-16a6f 16af5 16b37-16b3b 16b44 16e97-16e9a 16fe2 1bc9f "
        "1da87-1da8b 1e95e-1e95f "
    ),
}


# llama.cpp's whitespace (unicode_set_whitespace = Unicode's White_Space property). Python's
# own \s would also match U+001C..U+001F.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _class_char(cp: int) -> str:
    c = chr(cp)
    return re.escape(c) if cp < 128 else c


def _category_class(cat: str) -> str:
    """The inside of a regex character class matching llama.cpp's category `cat`."""
    parts = []
    for r in _UNICODE_RANGES[cat].split():
        a, _, b = r.partition("-")
        parts.append(_class_char(int(a, 16)) + (f"-{_class_char(int(b, 16))}" if b else ""))
    return "".join(parts)


def _python_regex(regex: str) -> str:
    """`regex` for Python's `re`, with llama.cpp's character classes and anchors.

    \\p{X} becomes llama.cpp's code point ranges of category X, \\s (\\S) its whitespace (or
    the rest), and `$` the end of the piece (std::regex has no multi-line mode).
    """
    out, inside, i = [], False, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            m = re.match(r"\\p\{(\w+)\}", regex[i:])
            if m:
                cls = _category_class(m.group(1))  # KeyError: a category llama.cpp's regexes never use
                out.append(cls if inside else f"[{cls}]")
                i += m.end()
                continue
            esc = regex[i:i + 2]
            if esc == "\\s":
                out.append(_WHITESPACE if inside else f"[{_WHITESPACE}]")
            elif esc == "\\S" and not inside:
                out.append(f"[^{_WHITESPACE}]")
            elif esc in ("\\S", "\\d", "\\D", "\\w", "\\W", "\\b", "\\B"):
                raise ValueError(f"{esc} has no llama.cpp equivalent here: {regex!r}")
            else:
                out.append(esc)
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside:
            inside = False
        elif c == "$" and not inside:
            c = r"\Z"
        elif c == "&" and inside and regex.startswith("&&", i):
            raise ValueError(f"class intersection is not supported: {regex!r}")
        out.append(c)
        i += 1
    return "".join(out)


_REGEXES = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "digits+gpt2": [r"\p{N}", _GPT2],  # starcoder, smollm, refact, ...: every digit on its own
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"],
    "deepseek-llm": ["[\r\n]", _DEEPSEEK_LATIN, _DEEPSEEK_PUNCT, r"\s+$", _DEEPSEEK_CJK, r"\p{N}+"],
}


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: str  # key of _REGEXES
    clean_spaces: bool = True  # llama.cpp's default for BPE vocabularies
    ignore_merges: bool = False  # a pre-token that is itself in the vocab is emitted whole
    add_bos: bool = False  # default when tokenizer.ggml.add_bos_token is absent


_PRE_TOKENIZERS = {
    "default": _PreTokenizer("default"),
    "gpt-2": _PreTokenizer("gpt2"),
    "phi-2": _PreTokenizer("gpt2"),
    "mpt": _PreTokenizer("gpt2"),
    "olmo": _PreTokenizer("gpt2"),
    "smollm": _PreTokenizer("digits+gpt2", clean_spaces=False),
    "starcoder": _PreTokenizer("digits+gpt2"),
    "refact": _PreTokenizer("digits+gpt2"),
    "codeshell": _PreTokenizer("digits+gpt2"),
    "command-r": _PreTokenizer("digits+gpt2", clean_spaces=False),
    "falcon": _PreTokenizer("falcon"),
    "llama3": _PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "llama-v3": _PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "llama-bpe": _PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "falcon3": _PreTokenizer("llama3", ignore_merges=True, add_bos=True),
    "dbrx": _PreTokenizer("llama3"),
    "smaug-bpe": _PreTokenizer("llama3"),
    "qwen2": _PreTokenizer("qwen2", clean_spaces=False),
    "deepseek-r1-qwen": _PreTokenizer("qwen2", clean_spaces=False),
    "stablelm2": _PreTokenizer("qwen2"),
    "megrez": _PreTokenizer("qwen2"),
    "qwen35": _PreTokenizer("qwen35", clean_spaces=False),
    "deepseek-coder": _PreTokenizer("deepseek-coder", clean_spaces=False),
    "deepseek-llm": _PreTokenizer("deepseek-llm", clean_spaces=False),
}

# --------------------------------------------------------------------------------------------
# llama.cpp recognises some special tokens by their text (llama_vocab::impl::load).
# --------------------------------------------------------------------------------------------

# Candidates for the role ids when the metadata does not name them; the chosen token is
# forced to CONTROL.
_ROLE_TEXTS = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
            "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_ROLE_CANDIDATES = frozenset(t for texts in _ROLE_TEXTS.values() for t in texts)
# Every token with one of these texts ends generation (and is forced to CONTROL).
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))
# metadata key suffix (tokenizer.ggml.<key>) → role; later keys win, as in llama.cpp.
_ROLE_KEYS = (
    ("bos_token_id", "bos"), ("eos_token_id", "eos"), ("eot_token_id", "eot"), ("eom_token_id", "eom"),
    ("unknown_token_id", "unk"), ("padding_token_id", "pad"),
    ("fim_pre_token_id", "fim_pre"), ("fim_suf_token_id", "fim_suf"), ("fim_mid_token_id", "fim_mid"),
    ("fim_pad_token_id", "fim_pad"), ("fim_rep_token_id", "fim_rep"), ("fim_sep_token_id", "fim_sep"),
    ("prefix_token_id", "fim_pre"), ("suffix_token_id", "fim_suf"), ("middle_token_id", "fim_mid"),
)

_C_SPACE = " \t\n\v\f\r"  # C isspace(), used by llama.cpp's lstrip/rstrip around special tokens
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are shifted to 256+."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


_BYTE_OF_CHAR = _gpt2_byte_chars()


class Tokenizer:
    """Text ↔ token ids for one GGUF vocabulary, with llama.cpp's semantics.

    Attributes: `model` ("gpt2" or "llama"), `pre` (pre-tokenizer name, BPE only), `vocab_size`,
    `bos_id`, `eos_id`, `eot_id`, `eom_id`, `pad_id`, `unk_id` (None when absent), `add_bos`,
    `add_eos`, `stop_ids` (every end-of-generation id, llama.cpp's `llama_vocab_is_eog`).
    """

    def __init__(self, path: str, metadata: dict):
        self.path = path
        md = metadata
        self.model = md.get("tokenizer.ggml.model")
        if self.model not in ("gpt2", "llama"):
            raise GGUFError(path, f"unsupported tokenizer model {self.model!r} (supported: gpt2, llama)")
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFError(path, "missing metadata key 'tokenizer.ggml.tokens'")
        # llama.cpp renames empty tokens so that every text is unique and non-empty.
        self._texts: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.vocab_size = n = len(self._texts)
        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            self._attr = [Attr.NORMAL] * n
        else:
            self._attr = [_TYPE_TO_ATTR.get(int(t), Attr.UNDEFINED) for t in types]

        is_bpe = self.model == "gpt2"
        if is_bpe:
            # llama.cpp falls back to "default" (with a loud warning) when the key is missing.
            self.pre = md.get("tokenizer.ggml.pre") or "default"
            pre = _PRE_TOKENIZERS.get(self.pre)
            if pre is None:
                raise GGUFError(path, f"unsupported tokenizer pre-tokenizer {self.pre!r}")
            self.clean_spaces = pre.clean_spaces  # detokenizer clean-up (" ." → ".")
            add_bos, add_space_prefix = pre.add_bos, False
            roles = {"bos": 11, "eos": 11}  # llama.cpp's BPE defaults (Falcon's ids)
        else:
            self.pre, pre = None, None
            self.clean_spaces = False
            add_bos, add_space_prefix = True, True
            roles = {"bos": 1, "eos": 2, "unk": 0}  # llama.cpp's SentencePiece defaults
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        # SentencePiece's "▁" in front of the text; decoding drops one leading space again.
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", add_space_prefix))

        roles = {k: v for k, v in roles.items() if v < n}
        for key, role in _ROLE_KEYS:
            v = md.get(f"tokenizer.ggml.{key}")
            if v is not None and 0 <= int(v) < n:  # llama.cpp ignores out-of-range ids
                roles[role] = int(v)
        self._find_roles_by_text(roles)
        self.bos_id, self.eos_id, self.unk_id = roles.get("bos"), roles.get("eos"), roles.get("unk")
        self.eot_id, self.eom_id, self.pad_id = roles.get("eot"), roles.get("eom"), roles.get("pad")
        self.stop_ids = self._eog_ids(roles)

        # Phi-3 strips whitespace to the right of most of its special tokens.
        name = str(md.get("general.name", "")).lower()
        if "phi-3" in name or "phi3" in name:
            ids = {t: i for i, t in enumerate(self._texts) if t in ("</s>", "<unk>", "<s>", "<|endoftext|>")}
            for i in range(n):
                if self._attr[i] & (Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN):
                    self._attr[i] |= Attr.RSTRIP
            if "</s>" in ids:
                self._attr[ids["</s>"]] |= Attr.RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in ids:
                    self._attr[ids[t]] &= ~Attr.RSTRIP

        # Special tokens are cut out of the text longest first (tokenizer_st_partition).
        self._specials = sorted(
            (i for i in range(n) if self._attr[i] & (Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN)),
            key=lambda i: -len(self._texts[i].encode()),
        )
        self._finders: dict = {}  # parse_special → (regex, prefixes), see _special_finder
        self._pieces: list[bytes | None] = [None] * n  # token_to_piece(special=True) cache
        if is_bpe:
            self._engine = _build_bpe(path, self._texts, md.get("tokenizer.ggml.merges"), pre)
            self._encode_raw = self._engine.encode
        else:
            self._engine = _build_spm(path, self._texts, md.get("tokenizer.ggml.scores"), self._attr, self.unk_id,
                                      self.add_space_prefix)
            # one call per fragment: a list argument goes through sentencepiece's thread pool
            self._encode_raw = lambda texts: [self._engine.EncodeAsIds(t) for t in texts]

    @classmethod
    def from_gguf(cls, gguf_file) -> Tokenizer:
        """Build the tokenizer of a `GGUFFile` (anything with `.path` and `.metadata`)."""
        return cls(str(gguf_file.path), gguf_file.metadata)

    # -- special token discovery ----------------------------------------------------------------

    def _find_roles_by_text(self, roles: dict) -> None:
        """Fill eot/eom/fim roles the metadata left out by token text, as llama.cpp does.

        With several candidates llama.cpp's pick follows its hash map's iteration order; we
        take the earliest text in the candidate list instead (e.g. <|eot_id|> over
        <|end_of_text|>, <|im_end|> over <|endoftext|>).
        """
        ids = {t: i for i, t in enumerate(self._texts) if t in _ROLE_CANDIDATES}
        for role, texts in _ROLE_TEXTS.items():
            if role in roles:
                continue
            found = next((ids[t] for t in texts if t in ids), None)
            if found is not None:
                roles[role] = found
                self._attr[found] |= Attr.CONTROL

    def _eog_ids(self, roles: dict) -> set[int]:
        eog = {roles[r] for r in ("fim_pad", "fim_rep", "fim_sep") if r in roles}
        for i, text in enumerate(self._texts):
            if text in _EOG_TEXTS:
                eog.add(i)
                self._attr[i] |= Attr.CONTROL
        eog.update(roles[r] for r in ("eos", "eot", "eom") if r in roles)
        return eog

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`.

        add_special: prepend BOS / append EOS when the vocabulary asks for them (`add_bos`,
        `add_eos`). parse_special: control tokens written in the text (e.g. `<|im_start|>`)
        become their ids; without it only user-defined tokens are recognised.
        """
        fragments = self._partition(text, parse_special) if text else []
        raw = iter(self._encode_raw([f for f in fragments if isinstance(f, str)]))
        ids: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path}: vocabulary asks for BOS but has no BOS token")
            ids.append(self.bos_id)
        for f in fragments:
            if isinstance(f, str):
                ids.extend(next(raw))
            else:
                ids.append(f)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise ValueError(f"{self.path}: vocabulary asks for EOS but has no EOS token")
            ids.append(self.eos_id)
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split `text` into raw-text pieces (str) and special token ids (int).

        llama.cpp's tokenizer_st_partition: special tokens are tried longest first (by UTF-8
        length); each one splits every raw piece at all its occurrences, leftmost first, the
        search resuming after each match (after the whitespace an RSTRIP token swallows).
        User-defined tokens always count; control and unknown tokens only with parse_special.
        Raw pieces are never empty.

        Only the special tokens that occur in `text` are tried: one regex scan finds, at every
        position, the longest one starting there; the others starting there are its prefixes.
        """
        finder, prefixes = self._special_finder(parse_special)
        if finder is None:
            return [text]
        found = set()
        for longest in set(finder.findall(text)):
            found.update(prefixes[longest])
        if not found:
            return [text]
        fragments: list[str | int] = [text]
        for tid in sorted(found):  # `found` holds ranks in llama.cpp's order
            tid = self._specials[tid]
            special, attr = self._texts[tid], self._attr[tid]
            n = len(special)
            out: list[str | int] = []
            for f in fragments:
                if isinstance(f, int) or special not in f:
                    out.append(f)
                    continue
                start, end = 0, len(f)
                while True:
                    match = f.find(special, start, end)
                    if match < 0:
                        if start < end:
                            out.append(f[start:end])
                        break
                    left = match
                    if attr & Attr.LSTRIP:
                        while left > start and f[left - 1] in _C_SPACE:
                            left -= 1
                    if left > start:
                        out.append(f[start:left])
                    out.append(tid)
                    start = match + n
                    if attr & Attr.RSTRIP:
                        while start < end and f[start] in _C_SPACE:
                            start += 1
            fragments = out
        return fragments

    def _special_finder(self, parse_special: bool):
        """(regex finding the longest special token at each position, its prefixes' ranks), cached.

        Ranks index `self._specials`; texts appearing twice keep the first (llama.cpp's sort is
        not stable, so which of two equal texts wins is unspecified there anyway).
        """
        cached = self._finders.get(parse_special)
        if cached is None:
            rank: dict[str, int] = {}
            for r, tid in enumerate(self._specials):
                if parse_special or not self._attr[tid] & (Attr.CONTROL | Attr.UNKNOWN):
                    rank.setdefault(self._texts[tid], r)
            if not rank:
                cached = (None, None)
            else:
                # every special token that is a prefix of another one is found with it
                prefixes = {t: [rank[t[:k]] for k in range(1, len(t) + 1) if t[:k] in rank] for t in rank}
                # a lookahead finds overlapping occurrences; the trie makes it longest-first
                cached = (re.compile(f"(?=({_trie_regex(list(rank))}))", re.DOTALL), prefixes)
            self._finders[parse_special] = cached
        return cached

    # -- decoding -------------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes of one token (llama.cpp's `llama_token_to_piece` with lstrip=0).

        Control and unknown tokens render as b"" unless `special`.
        """
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} out of range (vocab size {self.vocab_size})")
        if not special and self._attr[token_id] & (Attr.CONTROL | Attr.UNKNOWN):
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._render(token_id)
        return piece

    def _render(self, token_id: int) -> bytes:
        text, attr = self._texts[token_id], self._attr[token_id]
        if attr & (Attr.CONTROL | Attr.UNKNOWN | Attr.USER_DEFINED):
            return text.encode()
        if attr & Attr.NORMAL:
            if self.model == "llama":
                return text.replace("\u2581", " ").encode()
            return _byte_level_decode(text)
        if attr & Attr.BYTE:
            m = _BYTE_TOKEN.fullmatch(text)
            return bytes([int(m.group(1), 16)]) if m else b""
        return b""  # unused / undefined tokens render as nothing

    def decode(self, ids, special: bool = False) -> str:
        """Text of `ids`, as llama.cpp's `llama_detokenize(remove_special=False, unparse_special=special)`.

        That means: control tokens vanish unless `special`; with SentencePiece's space prefix
        the first token loses one leading space; BPE vocabularies with clean-up spaces get
        llama.cpp's " ." → "." style clean-up. Invalid UTF-8 becomes U+FFFD.
        """
        pieces = [self.token_to_piece(i, special) for i in ids]
        # llama.cpp drops one leading space of the first token, even when that token is BOS and
        # renders as nothing: then no space is dropped at all.
        if pieces and self.add_space_prefix and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        text = b"".join(pieces).decode("utf-8", "replace")
        return _clean_spaces(text) if self.clean_spaces else text

    def detokenizer(self, special: bool = False, continuation: bool = False) -> StreamingDetokenizer:
        """A streaming decoder: feed ids one at a time, get text as soon as it is complete.

        continuation: the ids continue earlier text (generated after a prompt), so the first
        token keeps its SentencePiece space, as in llama.cpp's printed output (each token's
        `token_to_piece`); by default the pieces concatenate to `decode(ids)`.
        """
        return StreamingDetokenizer(self, special, continuation)


def _trie_regex(words: list[str]) -> str:
    """A regex matching any of `words` (non-empty), the longest where several match."""
    trie: dict = {}
    for w in words:
        node = trie
        for c in w:
            node = node.setdefault(c, {})
        node[""] = {}  # end of a word

    def emit(node: dict) -> str:
        alts = [re.escape(c) + emit(child) for c, child in node.items() if c]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if "" in node:  # a word ends here: try the longer ones first
            return f"(?:{body})?" if len(alts) > 1 or len(body) > 1 else body + "?"
        return body

    return emit(trie)


def _byte_level_decode(text: str) -> bytes:
    """GPT-2 byte-level token text → bytes. llama.cpp spells unmappable characters out."""
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in text)
    except KeyError:
        out = bytearray()
        for c in text:
            b = _BYTE_OF_CHAR.get(c)
            if b is not None:
                out.append(b)
            else:
                out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
        return bytes(out)


class StreamingDetokenizer:
    """Incremental `Tokenizer.decode`: `add(id)` returns the newly completed text.

    Bytes go through an incremental UTF-8 decoder, so an unfinished multi-byte character is
    held back until its last byte arrives; the space clean-up (when the vocabulary uses it)
    holds back the few characters whose fate depends on what follows. Each token costs O(its
    length), and the concatenation of everything returned equals `decode(ids)` (with
    `continuation`: the text `decode` gives these ids after a prefix, less the prefix's text).
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False, continuation: bool = False):
        self._tok = tokenizer
        self._special = special
        self._strip_space = tokenizer.add_space_prefix and not continuation  # only the first token's
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._clean = _SpaceCleaner() if tokenizer.clean_spaces else None

    def add(self, token_id: int) -> str:
        piece = self._tok.token_to_piece(token_id, self._special)
        if self._strip_space:
            # llama.cpp drops one leading space of the first token, even when that token is
            # BOS and renders as nothing: then no space is dropped at all.
            self._strip_space = False
            if piece.startswith(b" "):
                piece = piece[1:]
        text = self._utf8.decode(piece)
        return self._clean.feed(text) if self._clean else text

    def finalize(self) -> str:
        """Flush what was held back (an incomplete UTF-8 sequence becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        if self._clean:
            text = self._clean.feed(text) + self._clean.flush()
        return text


# llama.cpp's `clean_spaces` detokenizer passes (llama_vocab::impl::detokenize), one after the
# other over the whole text: drop a space before ? ! . , ; " ' " → "'" (left to right, without
# overlaps); drop the space of " 's", " 'm", " 're", " 've". They only touch ASCII, so running
# them after the UTF-8 decoding (rather than on bytes) changes nothing.
_CLEAN_PASSES = (
    (re.compile(r" (?=[?!.,])"), ""),
    (re.compile(r" ' "), "'"),
    (re.compile(r" (?='(?:s|m|re|ve))"), ""),
)


def _clean_spaces(text: str) -> str:
    for pattern, repl in _CLEAN_PASSES:
        text = pattern.sub(repl, text)
    return text


class _SpaceCleaner:
    """llama.cpp's `clean_spaces` detokenizer passes (see _clean_spaces), as streaming state machines.

    The three passes run one after the other over the whole text in llama.cpp:
      1. drop a space before ? ! . ,
      2. " ' " → "'" (both spaces dropped; scanning left to right, non-overlapping)
      3. drop the space of " 's", " 'm", " 're", " 've"
    Each stage below keeps only the short suffix that may still change and passes the rest on.
    """

    def __init__(self):
        self._held = ["", "", ""]  # per pass: the pending text it may still rewrite

    def feed(self, text: str) -> str:
        for step in (self._pass1, self._pass2, self._pass3):
            text = "".join(map(step, text))
        return text

    def flush(self) -> str:
        text = ""
        for k, step in enumerate((self._pass1, self._pass2, self._pass3)):
            text = "".join(map(step, text))
            text, self._held[k] = text + self._held[k], ""
        return text

    def _pass1(self, c: str) -> str:
        held = self._held[0]  # "" or " "
        out = "" if held and c in "?!.," else held
        self._held[0] = " " if c == " " else ""
        return out if c == " " else out + c

    def _pass2(self, c: str) -> str:
        held = self._held[1]  # "", " " or " '"
        if held == " '":
            self._held[1] = ""
            # " ' " → "'": the trailing space is consumed and cannot start another match
            return "'" if c == " " else " '" + self._pass2(c)
        if held == " " and c == "'":
            self._held[1] = " '"
            return ""
        self._held[1] = " " if c == " " else ""
        return held if c == " " else held + c

    def _pass3(self, c: str) -> str:
        held = self._held[2]  # "", " ", " '", " 'r" or " 'v"
        if held in (" 'r", " 'v"):
            self._held[2] = ""
            return held[1:] + c if c == "e" else held + self._pass3(c)
        if held == " '":
            if c in "rv":
                self._held[2] = held + c
                return ""
            self._held[2] = ""
            return "'" + c if c in "sm" else held + self._pass3(c)
        if held == " " and c == "'":
            self._held[2] = " '"
            return ""
        self._held[2] = " " if c == " " else ""
        return held if c == " " else held + c


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


def _build_bpe(path: str, texts: list[str], merges, pre: _PreTokenizer) -> _BPE:
    from tokenizers import models

    if merges is None:
        raise GGUFError(path, "missing metadata key 'tokenizer.ggml.merges'")
    vocab = {t: i for i, t in enumerate(texts)}
    pairs = []
    for m in merges:
        # llama.cpp splits at the first space after the first character.
        cut = m.find(" ", 1)
        a, b = (m[:cut], m[cut + 1:]) if cut > 0 else ("", "")
        # HF refuses merges of or into unknown tokens; llama.cpp could never emit those as one
        # token anyway, so dropping them only matters for malformed vocabularies.
        if a in vocab and b in vocab and a + b in vocab:
            pairs.append((a, b))
    # A character missing from the vocabulary stays a symbol of its own in llama.cpp, blocking
    # merges across it, and is dropped at the end. HF would drop it first and merge across the
    # gap, so missing byte characters get placeholder ids ≥ vocab size, filtered from the output.
    for c in _BYTE_OF_CHAR:
        vocab.setdefault(c, len(vocab))
    model = models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges)
    return _BPE(model, _REGEXES[pre.regexes], len(texts))


# bytes (as latin-1 characters) → GPT-2's byte-level characters, for str.translate
_BYTE_LEVEL = {b: c for c, b in _BYTE_OF_CHAR.items()}
_WORD_CACHE_SIZE = 1 << 17


class _BPE:
    """Byte-level BPE as llama.cpp runs it (llm_tokenizer_bpe_session).

    The text is cut into words by the pre-tokenizer's regex chain (Python's `re`); each word's
    UTF-8 bytes, spelled in GPT-2's byte alphabet, are merged by HF's BPE model (lowest rank
    first, leftmost on ties, as llama.cpp). Words repeat a lot in text, so their ids are cached.
    """

    def __init__(self, model, regexes: list[str], n_vocab: int):
        self._model = model
        # the capturing group makes re.split return the matches as well as the text between them
        self._splits = [re.compile(f"({_python_regex(r)})").split for r in regexes]
        self._n_vocab = n_vocab
        self._cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[str]:
        """The pre-tokenizer's pieces of `text` (non-empty, in order, concatenating to `text`)."""
        words = [text]
        for split in self._splits:
            words = [w for piece in words for w in split(piece) if w]
        return words

    def encode(self, texts: list[str]) -> list[list[int]]:
        cache = self._cache
        if len(cache) > _WORD_CACHE_SIZE:
            self._cache = cache = {}  # a new dict: another thread may still be reading the old one
        get, merge = cache.get, self._merge
        out = []
        for text in texts:
            ids = [get(w) or merge(w) for w in self.words(text)]
            out.append(list(chain.from_iterable(ids)))
        return out

    def _merge(self, word: str) -> list[int]:
        chars = word.encode().decode("latin-1").translate(_BYTE_LEVEL)
        n = self._n_vocab
        ids = self._cache[word] = [t.id for t in self._model.tokenize(chars) if t.id < n]  # no placeholders
        return ids


def _build_spm(path: str, texts: list[str], scores, attrs: list, unk_id, add_space_prefix: bool):
    import sentencepiece as spm

    if unk_id is None:
        raise GGUFError(path, "SentencePiece vocabulary without an unknown token")
    pieces = []
    for i, text in enumerate(texts):
        score = float(scores[i]) if scores is not None else 0.0
        # llama.cpp merges into any token whose text matches, whatever its type, and has cut
        # special tokens out beforehand; so everything but the byte and unk tokens is NORMAL.
        if i == unk_id:
            kind = _SP_UNKNOWN
        elif attrs[i] & Attr.BYTE and _BYTE_TOKEN.fullmatch(text):
            kind, text = _SP_BYTE, f"<0x{text[3:5].upper()}>"
        else:
            kind = _SP_NORMAL
        pieces.append(_pb_message(1, _pb_bytes(1, text.encode()) + _pb_float(2, score) + _pb_varint(3, kind)))
    trainer = _pb_varint(3, _SP_MODEL_BPE) + _pb_varint(4, len(texts))
    trainer += _pb_varint(35, 1)  # byte_fallback: characters without a token become <0xXX> tokens
    # llama.cpp does no normalisation and never collapses whitespace for SentencePiece
    # vocabularies (tokenizer.ggml.remove_extra_whitespaces is only honoured by its T5
    # tokenizer), so neither do we. The dummy prefix goes in front of every raw fragment, as in
    # llama.cpp, where each fragment is either the first one or follows a special token.
    normalizer = _pb_bytes(1, b"identity") + _pb_varint(3, int(add_space_prefix))
    normalizer += _pb_varint(4, 0) + _pb_varint(5, 1)  # remove_extra_whitespaces, escape_whitespaces
    proto = b"".join(pieces) + _pb_message(2, trainer) + _pb_message(3, normalizer)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    return sp


# A sentencepiece ModelProto is serialised by hand (field numbers from sentencepiece_model.proto)
# so that we do not depend on protobuf just to write a dozen fields.
_SP_NORMAL, _SP_UNKNOWN, _SP_BYTE = 1, 2, 6  # ModelProto.SentencePiece.Type
_SP_MODEL_BPE = 2  # TrainerSpec.ModelType


def _pb_varint_raw(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _pb_varint(field: int, v: int) -> bytes:
    return _pb_varint_raw(field << 3) + _pb_varint_raw(v)


def _pb_float(field: int, v: float) -> bytes:
    return _pb_varint_raw(field << 3 | 5) + struct.pack("<f", v)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _pb_varint_raw(field << 3 | 2) + _pb_varint_raw(len(data)) + data


_pb_message = _pb_bytes
