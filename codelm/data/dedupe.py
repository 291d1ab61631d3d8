"""Deduplication: a document's digest for exact copies (``doc_digest``, ``is_duplicate``) and
MinHash signatures with an LSH index for near copies (``NearDuplicateIndex``)."""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections.abc import Sequence

import numpy as np

from codelm.data.sources import Doc

if typing.TYPE_CHECKING:
    import datasketch


def stored(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")


def doc_digest(doc: Doc) -> bytes:
    """The SHA-256 of a document as stored (a pair's target, a conversation's tools too): what
    exact dedupe compares."""
    h = hashlib.sha256(stored(doc.text))
    if doc.target is not None:
        h.update(b"\0target\0" + stored(doc.target))
    if doc.tools is not None:
        h.update(b"\0tools\0" + stored(json.dumps(doc.tools, sort_keys=True)))
    return h.digest()


def is_duplicate(key: bytes, split: str | None, seen: dict[bytes, str | None], dedupe: bool
                  ) -> bool:
    """Whether the document of digest ``key`` repeats an earlier one (``seen``: digest -> split
    of the first copy, which a first copy joins). A copy in another split always does, so no
    document sits in two; ``dedupe`` decides the rest."""
    if key not in seen:
        seen[key] = split
        return False
    return dedupe or seen[key] != split


_SHINGLE_WORDS = re.compile(r"\w+|[^\w\s]")
def shingles(text: str, shingle: int = 5) -> set[str]:
    """The word ``shingle``-grams of a text: the sets whose Jaccard MinHash estimates."""
    words = _SHINGLE_WORDS.findall(text)
    return {" ".join(words[j : j + shingle]) for j in range(max(1, len(words) - shingle + 1))}


def minhash(text: str, num_perm: int = 256) -> datasketch.MinHash:
    """datasketch's MinHash of the text's shingles (a fixed seed: the same text, the same one)."""
    import datasketch  # half a second to import; near-dedupe is off by default

    signature = datasketch.MinHash(num_perm=num_perm, seed=1)
    signature.update_batch([s.encode() for s in shingles(text)])
    return signature


def minhash_version() -> str:
    """The MinHash hashing in use, by datasketch's major version (2 changed its hash scheme):
    signatures of another are other values, never mixed with these in one corpus."""
    from importlib.metadata import version

    return f"datasketch {version('datasketch').split('.')[0]}"


def signature(text: str, num_perm: int = 256) -> np.ndarray:
    """The MinHash values of ``text`` as uint32 (datasketch's are below 2**32): 4 bytes a value."""
    return minhash(text, num_perm).hashvalues.astype(np.uint32)


class NearDuplicateIndex:
    """MinHash LSH over the kept texts' signatures, as datasketch's MinHashLSH: the candidates
    of a signature are the kept ones equal to it in a whole band, and a candidate whose
    estimated Jaccard (equal values / values) reaches ``threshold`` makes it a near duplicate.
    256 values, as the StarCoder data's dedupe: an estimate's spread (about 0.03 at 0.8) stays
    under the threshold's margin though a file meets hundreds of similar ones (64 values, 0.05,
    drop files of true Jaccard 0.75 at 0.85). The bands are as long as a pair at the threshold
    still shares one (``_band_rows``). Signatures are rows of one uint32 array, a band a dict
    of its values' bytes: a kept file costs about 4 KB at 0.85 (6 KB at 0.7, 10 KB at 0.5),
    not a MinHash object."""

    NUM_PERM = 256  # values per signature, unless given

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        self.threshold = threshold
        self.num_perm = num_perm
        self.rows = _band_rows(threshold, num_perm)
        self.bands: list[dict[bytes, int | list[int]]] = [{} for _ in range(num_perm // self.rows)]
        self.signatures = np.empty((0, num_perm), np.uint32)
        self.n = 0

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[b * self.rows : (b + 1) * self.rows].tobytes() for b in range(len(self.bands))]

    def is_near_duplicate(self, sig: np.ndarray) -> bool:
        candidates: set[int] = set()
        for band, key in zip(self.bands, self._band_keys(sig)):
            found = band.get(key)
            if found is not None:
                candidates.update(found if isinstance(found, list) else (found,))
        if not candidates:
            return False
        equal = np.count_nonzero(self.signatures[sorted(candidates)] == sig, axis=1)
        return bool(equal.max() / self.num_perm >= self.threshold)

    def add(self, sig: np.ndarray) -> None:
        if self.n == len(self.signatures):  # grown by half: amortised appends
            grown = np.empty((max(1024, self.n * 3 // 2), self.num_perm), np.uint32)
            grown[: self.n] = self.signatures[: self.n]
            self.signatures = grown
        self.signatures[self.n] = sig
        for band, key in zip(self.bands, self._band_keys(sig)):
            found = band.get(key)
            if found is None:
                band[key] = self.n
            elif isinstance(found, list):
                found.append(self.n)
            else:
                band[key] = [found, self.n]
        self.n += 1

    def keep_if_new(self, sig: np.ndarray) -> bool:
        """Whether ``sig`` is no near duplicate of a kept one; a new one is kept."""
        if self.is_near_duplicate(sig):
            return False
        self.add(sig)
        return True


def _band_rows(threshold: float, num_perm: int) -> int:
    """The most values a band may hold (a power of two) while a pair of Jaccard ``threshold``
    still shares some band with probability 0.999: longer bands, fewer chance candidates to
    compare (8 at 0.85 with 256 values, 2 at 0.45)."""
    rows = 1
    while (num_perm % (rows * 2) == 0
           and 1 - (1 - threshold ** (rows * 2)) ** (num_perm // (rows * 2)) >= 0.999):
        rows *= 2
    return rows


def near_duplicates(texts: Sequence[str], threshold: float = 0.85, num_perm: int = 256
                    ) -> set[int]:
    """Indices of texts whose estimated Jaccard similarity to an earlier kept text is >=
    threshold (LSH bands find candidates, the full signature confirms them)."""
    index = NearDuplicateIndex(threshold, num_perm)
    return {i for i, text in enumerate(texts) if not index.keep_if_new(signature(text, num_perm))}
