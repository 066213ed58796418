"""Sample keys: one per source file or tar sample, never two files to one key.

webdataset splits a member name at the first dot of its base name (`<key>.jpg`), so a key holds no dot;
replacing dots by '_' made `a.b.jpg` and `a_b.jpg` one key. Keys are escaped instead, which can be undone:
letters, digits, '_' and '-' stay, every other character becomes '%XX' per byte of its UTF-8 encoding
(file names that are not UTF-8 keep their raw bytes), as in a URL; `urllib.parse.unquote(key)` gives the
name back. '%' itself is escaped, so two names never share a key.
"""

import string

_KEPT = frozenset(string.ascii_letters + string.digits + "_-")


def escape_key(name: str) -> str:
    return "".join(c if c in _KEPT else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
                   for c in name)
