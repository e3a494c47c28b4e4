"""IVF inverted lists on disk: the trained ivfpq index keeps its lists in a memory-mapped file (`ondisk=True`).

An IVF-PQ index is a coarse quantizer and PQ codebooks (small, in RAM) plus the inverted lists: for each list the
PQ codes and row ids of its vectors (pq_m + 8 bytes per vector), which is what grows with the data. `OnDiskIVF`
keeps them in two parts:
  base   an immutable, packed `faiss.OnDiskInvertedLists` file `lists.<token>.ivfdata` in the data dir, mapped
         read-only: the process holds only the pages that searches touch (page cache, which the OS evicts under
         pressure), so an index larger than RAM stays searchable;
  delta  the lists of rows added since the base was written, in RAM (`ArrayInvertedLists`).
Searches see both through one IVF index whose lists are a `faiss.HStackInvertedLists` (per list: base entries,
then delta entries: the order an in-RAM index has, so the answers are the same). When the delta reaches
max(`merge_rows`, base rows / 8) rows, and at every snapshot, base and delta are merged into a new packed file
(`OnDiskInvertedLists.merge_from_multiple`, FAISS's own way of building on-disk indexes) and the delta empties.

Why not let FAISS grow the mapped lists in place: `OnDiskInvertedLists` moves a list that outgrows its slot and
reuses freed slots, and a file written by `merge_from_multiple` leaves its whole extent on the free-slot list, so
growing it overwrites live lists (measured: thousands of corrupted ids after one reload). A base file is never
written after it is packed, which also makes it crash-safe for free: a snapshot names its base file, a restart
maps that file and replays the log into the delta, and files no committed snapshot names are deleted.
Deletion stays a tombstone in the store's live-row bitmap, as for every index kind.

Data enters as a trained IVF index (`OnDiskIVF(trained, ...)`) or a snapshot (`OnDiskIVF.load`) and leaves
through `search` and `save`. Callers hold the store's write lock around every mutation.
"""

from __future__ import annotations

import os
import re

import faiss

LISTS_FILE = re.compile(r"^lists\.[0-9a-f]+\.ivfdata$")  # base files in the data dir


def _ivf(index) -> faiss.IndexIVF:
    return faiss.extract_index_ivf(index)


def lists_of(index) -> faiss.InvertedLists:
    """The inverted lists of an IVF index (or of an OnDiskIVF's search view), downcast to their concrete type."""
    if isinstance(index, OnDiskIVF):
        index = index.view
    return faiss.downcast_InvertedLists(_ivf(index).invlists)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def clone_empty(index):
    """A copy of a trained IVF index (quantizer, PQ codebooks) with empty in-RAM lists. `faiss.clone_index`
    cannot copy on-disk lists, so the lists are swapped out for the copy."""
    ivf = _ivf(index)
    lists, own, ntotal = ivf.invlists, ivf.own_invlists, ivf.ntotal
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False
    ivf.replace_invlists(empty, False)
    ivf.ntotal = 0
    try:
        return faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, own)
        ivf.ntotal = ntotal


def to_ram(index) -> None:
    """Copies the (on-disk) lists of `index` into RAM lists, which the index then owns."""
    ivf = _ivf(index)
    ram = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    lists_of(index).copy_subset_to(ram, faiss.InvertedLists.SUBSET_TYPE_INVLIST, 0, ivf.nlist)
    ivf.replace_invlists(ram, True)
    ram.this.disown()


def map_lists(holder, path: str) -> faiss.OnDiskInvertedLists:
    """Maps the base file `path` read-only into the lists of `holder`, an index read with IO_FLAG_SKIP_IVF_DATA."""
    lists = lists_of(holder)
    size = os.path.getsize(path) if os.path.exists(path) else -1
    if size < lists.totsize:  # mapping a short file would crash the process (SIGBUS) at the first search
        raise ValueError(f"{path} has {size} bytes but the index needs {lists.totsize}; the data dir is damaged: "
                         "restore it from a backup or start with a new --data-dir")
    lists.filename, lists.read_only, lists.prefetch_nthread = path, True, 0
    if lists.totsize > 0:  # FAISS cannot map an empty file; empty lists are never read
        lists.do_mmap()
    return lists


class OnDiskIVF:
    """A trained IVF index with an immutable on-disk base and an in-RAM delta (see the module docstring). It has
    the methods VectorIndex uses of a FAISS index: `add_with_ids`, `search`, `ntotal`, `reset`."""

    def __init__(self, trained, lists_dir: str, merge_rows: int, *, delta=None):
        self.lists_dir, self.merge_rows = lists_dir, merge_rows
        self.delta = delta if delta is not None else clone_empty(trained)  # where adds go
        self.view = clone_empty(trained)  # searches: its lists are the base, the delta or both
        self._holder = None  # keeps the base lists alive when they belong to an index read from a snapshot
        self.base, self.base_name, self.base_rows = None, None, 0
        self.saved_name = None  # the base file the last snapshot names: it must survive until the next one
        self._stack = None
        self._refresh()

    is_trained = True

    @property
    def ntotal(self) -> int:
        return self.base_rows + self.delta.ntotal

    def add_with_ids(self, x_nd, rows) -> None:
        self.delta.add_with_ids(x_nd, rows)
        if self.delta.ntotal >= max(self.merge_rows, self.base_rows // 8):
            self.merge()
        else:
            self._refresh()

    def search(self, q_bd, k, params=None):
        return self.view.search(q_bd, k, params=params)

    def reset(self) -> None:
        """Empties the index (compaction re-adds the live rows); the trained quantizers stay."""
        self.delta.reset()
        self._set_base(None, None, None)

    def _refresh(self) -> None:
        """Points the search view at base and/or delta; it owns neither."""
        parts = [lists for lists, n in ((self.base, self.base_rows), (self.delta.invlists, self.delta.ntotal))
                 if lists is not None and n > 0]
        stack = None
        if len(parts) == 2:
            pointers = faiss.InvertedListsPtrVector()
            for lists in parts:
                pointers.push_back(lists)
            stack = faiss.HStackInvertedLists(2, pointers.data())
        target = stack if stack is not None else (parts[0] if parts else self.base or self.delta.invlists)
        view = _ivf(self.view)
        view.replace_invlists(target, False)
        self._stack = stack  # the old stack is freed only now, after the view stopped pointing at it
        view.ntotal = self.ntotal

    def _set_base(self, lists, name, holder) -> None:
        old, old_refs = self.base_name, (self.base, self._holder)  # alive until the view stops using them
        self.base, self.base_name, self._holder = lists, name, holder
        self.base_rows = lists.compute_ntotal() if lists is not None else 0
        self._refresh()
        del old_refs  # now the old base is unreferenced and unmapped
        if old is not None and old not in (self.saved_name, name):  # written since the last snapshot: garbage
            os.remove(os.path.join(self.lists_dir, old))

    def merge(self) -> None:
        """Packs base + delta into a new base file, maps it read-only, and empties the delta."""
        name = f"lists.{os.urandom(6).hex()}.ivfdata"
        path = os.path.join(self.lists_dir, name)
        ivf = _ivf(self.delta)
        packed = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, path)
        sources = faiss.InvertedListsPtrVector()
        for lists, n in ((self.base, self.base_rows), (self.delta.invlists, self.delta.ntotal)):
            if lists is not None and n > 0:
                sources.push_back(lists)
        if sources.size():
            packed.merge_from_multiple(sources.data(), sources.size(), False, False)
        else:
            open(path, "wb").close()
        _fsync(path)  # the pages written through the mapping go to disk with the file
        packed.read_only, packed.prefetch_nthread = True, 0  # never written again (FAISS refuses if asked)
        self.delta.reset()
        self._set_base(packed, name, None)

    # ----------------------------------------------------------------------------------- persistence
    def save(self, directory: str) -> str:
        """Merges the delta into a new base file and writes the index (quantizers + list offsets) to
        `directory/index.faiss`; returns the base file's name, which the snapshot must keep."""
        if self.delta.ntotal > 0 or self.base is None:
            self.merge()
        faiss.write_index(self.view, os.path.join(directory, "index.faiss"))  # the view's lists are the base
        self.saved_name = self.base_name
        return self.base_name

    @classmethod
    def load(cls, directory: str, lists_name: str, lists_dir: str, merge_rows: int) -> "OnDiskIVF":
        holder = faiss.read_index(os.path.join(directory, "index.faiss"), faiss.IO_FLAG_SKIP_IVF_DATA)
        lists = map_lists(holder, os.path.join(lists_dir, lists_name))
        self = cls(holder, lists_dir, merge_rows)
        self.saved_name = lists_name
        self._set_base(lists, lists_name, holder)
        return self


def read_ivf(directory: str, meta: dict, lists_dir: str | None, ondisk: bool, merge_rows: int):
    """The trained IVF index of a snapshot, with its lists where `ondisk` says, whichever way it was written:
    an OnDiskIVF (lists_dir required) or a FAISS index with its lists in RAM."""
    path = os.path.join(directory, "index.faiss")
    if meta.get("lists"):  # written with on-disk lists
        if ondisk:
            return OnDiskIVF.load(directory, meta["lists"], lists_dir, merge_rows)
        holder = faiss.read_index(path, faiss.IO_FLAG_SKIP_IVF_DATA)
        map_lists(holder, os.path.join(lists_dir, meta["lists"]))
        to_ram(holder)
        return holder
    index = faiss.read_index(path)
    if not ondisk:
        return index
    moved = OnDiskIVF(index, lists_dir, merge_rows, delta=index)  # the in-RAM lists become the first base
    moved.merge()
    return moved
