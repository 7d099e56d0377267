"""Names from users and data (class, image, model names) made safe to use in paths and messages.

`safe_name` is the one place a name becomes part of a path the project writes: whatever a flag,
a YAML file, a jsonl record or a folder on disk calls a thing, the file lands under the output
folder. `did_you_mean` turns an unknown name into a hint of the closest known ones.

File names that are not UTF-8 (on Linux `os.fsdecode` keeps their undecodable bytes as surrogate
escapes, `'\\udcff'`) are written into text files as `printable` gives them: each such byte as
`\\xNN`, so every CSV, JSON and HTML file the project writes is valid UTF-8. `short_stem` keeps a
stem that derived names extend within the file system's 255 bytes.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path, PurePath

NAME_BYTES = 255  # the longest file name of ext4, XFS, APFS and NTFS
_SEPARATORS = re.compile(r"[/\\]+")
_DOTS = re.compile(r"\.{2,}")


def safe_name(name: str) -> str:
    """`name` as one path component: control characters dropped, path separators turned into
    `_`, `..` runs into `.`, leading dots stripped; a name over 255 bytes keeps its start and
    suffix around a hash of the whole. `a/b.png` -> `a_b.png`, `../../x` -> `x`."""
    text = "".join(char for char in str(name) if not unicodedata.category(char).startswith("C"))
    parts = [_DOTS.sub(".", part).lstrip(".") for part in _SEPARATORS.split(text)]
    text = "_".join(part for part in parts if part)
    if not text:
        return "_"
    encoded = text.encode("utf-8")
    if len(encoded) <= NAME_BYTES:
        return text
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    suffix = re.search(r"\.[A-Za-z0-9]{1,8}$", text)
    tail = f"-{digest}{suffix.group() if suffix else ''}"
    head = encoded[: NAME_BYTES - len(tail)].decode("utf-8", errors="ignore")
    return head + tail


def printable(name: str) -> str:
    """`name` as valid UTF-8 text: the bytes of a file name that were not UTF-8 (the surrogate
    escapes of `os.fsdecode`) as `\\xNN`: the name of bytes `a 0xff b .png` reads `a\\xffb.png`;
    other names unchanged."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def short_stem(stem: str, reserve: int) -> str:
    """`stem` when it and `reserve` more bytes fit one file name (NAME_BYTES in the file
    system's encoding), else its start and a hash of the whole: names derived from it by
    appending at most `reserve` bytes stay legal and distinct."""
    limit = NAME_BYTES - reserve
    encoded = os.fsencode(stem)
    if len(encoded) <= limit:
        return stem
    tail = "-" + hashlib.sha256(encoded).hexdigest()[:16]
    head, size = "", len(tail)
    for char in stem:  # whole characters: a multi-byte one is never cut in half
        size += len(os.fsencode(char))
        if size > limit:
            break
        head += char
    return head + tail


def safe_relative(path: str | PurePath) -> Path:
    """A record's path as a relative path of `safe_name` parts, so that joined to an output
    folder it stays inside: `a/b.png` -> `a/b.png`, `/x/../y.png` -> `x/y.png`."""
    parts = [part for part in PurePath(path).parts if part not in ("/", "\\", "..", ".")]
    return Path(*(safe_name(part) for part in parts)) if parts else Path("_")


def did_you_mean(name: str, known: Iterable[str], listing: str = "") -> str:
    """`; did you mean A, B or C?` for the three known names closest to `name` (an empty
    string when none is close), then where the full list is (`listing`) if given."""
    known = [str(item) for item in known]
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
    lowered = {item.lower(): item for item in known}
    if not close and str(name).lower() in lowered:
        close = [lowered[str(name).lower()]]
    hint = ""
    if close:
        words = ", ".join(close[:-1]) + (" or " if len(close) > 1 else "") + close[-1]
        hint = f"; did you mean {words}?"
    return hint + (f" ({listing})" if listing else "")
