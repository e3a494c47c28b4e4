"""IVF inverted lists on disk: the trained ivfpq index keeps its lists in a memory-mapped file (`ondisk=True`).

An IVF-PQ index is a coarse quantizer and PQ codebooks (small, in RAM) plus the inverted lists: for each list the
PQ codes and row ids of its vectors (pq_m + 8 bytes per vector), which is what grows with the data. With
`ondisk` FAISS's `OnDiskInvertedLists` hold them in a file mapped into memory, so the process keeps only the
pages that searches touch (page cache, which the OS evicts under pressure) and an index larger than RAM stays
searchable. Together with the raw vectors (already a memory-mapped file) nothing that grows with the data lives
in anonymous memory.

Crash safety: adds change the mapped file in place, and FAISS moves a list that outgrows its slot and reuses the
old slot, so between snapshots the file is never a consistent picture. The store therefore works on a scratch
file (`lists.work.ivfdata` in its data dir). A snapshot writes the index (quantizers and list offsets, no codes)
with `faiss.write_index` plus a fsynced copy of the lists file beside it (`snap.<gen>/lists.ivfdata`); loading
copies the snapshot's file back over the scratch file and maps it. A crash at any point restarts from a
committed snapshot's own copy and replays the log. Deletion stays a tombstone in the store's live-row bitmap (as
for every index kind): FAISS's `remove_ids` works on these lists too, but would rewrite them in place.

Data enters as a trained in-RAM IVF index (`use_lists`) or a snapshot directory (`read`), and leaves as a
snapshot directory (`write`). Callers hold the store's write lock around every mutation.
"""

from __future__ import annotations

import os
import shutil

import faiss

LISTS_NAME = "lists.ivfdata"  # the lists file inside a snapshot directory


def _ivf(index) -> faiss.IndexIVF:
    return faiss.extract_index_ivf(index)


def lists_of(index) -> faiss.InvertedLists:
    """The index's inverted lists, downcast to their concrete type (ArrayInvertedLists or OnDiskInvertedLists)."""
    return faiss.downcast_InvertedLists(_ivf(index).invlists)


def is_ondisk(index) -> bool:
    return isinstance(index, faiss.IndexIVF) and isinstance(lists_of(index), faiss.OnDiskInvertedLists)


def _new_lists(ivf: faiss.IndexIVF, path: str | None) -> faiss.InvertedLists:
    if path is None:
        return faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    if os.path.exists(path):
        # Unlink rather than truncate: a mapping of the old file (about to be released) stays valid meanwhile.
        os.remove(path)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, path)
    lists.prefetch_nthread = 0  # FAISS would start 32 prefetch threads per search; the scan pages in what it reads
    return lists


def _install(ivf: faiss.IndexIVF, lists: faiss.InvertedLists) -> None:
    ivf.replace_invlists(lists, True)  # the index owns (and frees) the lists from now on; the old ones are freed
    lists.this.disown()


def use_lists(index, path: str | None) -> None:
    """Gives an IVF index new, empty lists (its trained quantizers stay): in RAM (`path` None) or in a new file."""
    ivf = _ivf(index)
    _install(ivf, _new_lists(ivf, path))
    ivf.ntotal = 0
    index.ntotal = 0


def _move(index, path: str | None) -> None:
    """Copies the lists of `index` into new lists (RAM or a file at `path`) and installs those."""
    ivf = _ivf(index)
    lists = _new_lists(ivf, path)
    lists_of(index).copy_subset_to(lists, faiss.InvertedLists.SUBSET_TYPE_INVLIST, 0, ivf.nlist)
    _install(ivf, lists)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def write(index, directory: str) -> None:
    """Saves an index with on-disk lists: `index.faiss` (no codes) and a fsynced copy of the lists file."""
    lists = lists_of(index)
    faiss.write_index(index, os.path.join(directory, "index.faiss"))
    dst = os.path.join(directory, LISTS_NAME)
    if lists.totsize > 0:  # reads see the mapping's unwritten pages: they are the same page cache
        shutil.copyfile(lists.filename, dst)
    else:  # nothing was ever added: FAISS has not created the file yet
        open(dst, "wb").close()
    _fsync(dst)


def read(directory: str, saved_ondisk: bool, work_path: str | None):
    """Loads the trained IVF index saved in `directory`, with its lists on disk at `work_path` or, when that is
    None, in RAM. Converts between the two when the snapshot was written the other way. The snapshot's own files
    are never modified."""
    path = os.path.join(directory, "index.faiss")
    if not saved_ondisk:
        index = faiss.read_index(path)
        if work_path is not None:
            _move(index, work_path)
        return index
    index = faiss.read_index(path, faiss.IO_FLAG_SKIP_IVF_DATA)  # offsets only: the data is mapped below
    lists = lists_of(index)
    lists.prefetch_nthread = 0
    saved = os.path.join(directory, LISTS_NAME)
    size = os.path.getsize(saved) if os.path.exists(saved) else -1
    if size < lists.totsize:  # mapping a short file would crash the process (SIGBUS) at the first search
        raise ValueError(f"{saved} has {size} bytes but the index in {directory} needs {lists.totsize}; the "
                         "snapshot is damaged: restore the data dir from a backup or start with a new --data-dir")
    if work_path is None:  # on disk -> RAM: read the snapshot's file without writing to it
        lists.filename, lists.read_only = saved, True
        if lists.totsize > 0:
            lists.do_mmap()
        _move(index, None)
        return index
    if os.path.exists(work_path):
        os.remove(work_path)
    if lists.totsize > 0:
        shutil.copyfile(saved, work_path)
    lists.filename = work_path
    if lists.totsize > 0:
        lists.do_mmap()
    return index
