"""One snapshot file on disk: written durably, read back only after full verification.

Writing follows one protocol, in this order (docs/FORMAT.md, "Commit"):

1. create a temporary file in the destination directory (``O_EXCL``, mode 0600), named
   ``.tmp.<final name>.<pid>.<random>`` so a crashed writer's leftovers are recognisable;
2. preallocate the whole size, so a full disk fails before any data is written;
3. write the data section, digesting it as it goes and starting its writeback group by
   group, then the header (which holds the digests) at offset 0; every write loop
   honours short writes;
4. ``fsync`` the file, close it;
5. ``rename`` it to the final name, ``fsync`` the directory.

Any ``OSError`` on the way abandons the attempt: the temporary file is closed and
unlinked and :class:`CommitFailed` is raised. Data that arrives while it is written (an
experiment's streamed arena, ``Payload.ready``) is waited for piece by piece; when it
stops coming, the attempt is abandoned the same way, but the peer's error is raised as
it is, since the disk did nothing wrong. A failed ``fsync`` is never retried on the
same descriptor (after a write-back error Linux may report success over lost data); a
retry is a new file. Crash points between the steps let tests kill the writer anywhere.

Reading opens with ``O_NOFOLLOW``, checks that the file is regular, validates the header
against the file size, and checks every tensor's digest before a single array is handed
out or changed: it reads the data section into one fresh buffer, or (for a store's
files, which never change once written) restores into the arrays the object being
restored already has.

This module also holds the store-less library functions :func:`save` and :func:`load`.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import secrets
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, cast

import numpy as np

from snapshotd import collector, lanes
from snapshotd.crashpoint import crashpoint
from snapshotd.errors import (
    CommitFailed,
    PeerError,
    ProtocolError,
    SnapshotCorrupt,
    StoreError,
    UsageError,
)
from snapshotd.format import (
    Header,
    Layout,
    Meta,
    Template,
    Tensor,
    decode_header,
    digest,
    digester,
    header_length,
)
from snapshotd.recent import Recent
from snapshotd.target import Target, adapt, fillable_state, overlapping, state_of
from snapshotd.tree import Flat, flatten, unflatten

__all__ = [
    "Encoded",
    "Loaded",
    "Payload",
    "arrays_of",
    "encode",
    "fsync_directory",
    "load",
    "read",
    "read_header",
    "restore_into",
    "save",
    "user_metadata",
    "write",
]

TMP_PREFIX = ".tmp."
#: A C-contiguous bytes-like object: a memoryview or a contiguous ndarray.
Buffer = Any
_IOV_MAX = 1024


@dataclass(frozen=True)
class Encoded:
    """A snapshot ready to write: its data, its header template and its metadata.

    The digests, and so the header, are computed while the data is written (see
    :func:`write`); ``header_size`` is known before, as every digest has 32 digits.
    """

    payload: Payload
    template: Template
    meta: Meta
    header_size: int

    @property
    def nbytes(self) -> int:
        return self.header_size + self.payload.layout.data_size


@dataclass(frozen=True)
class Payload:
    """What a snapshot holds: a layout, a tree structure and the data, in file order.

    ``buffers`` concatenated are the data section: either one buffer per tensor (a
    flattened state) or one contiguous buffer for all of them (an experiment's arena,
    whose offsets are the file's), which is written in one piece.
    """

    layout: Layout
    structure: Any
    buffers: tuple[Buffer, ...]
    #: The tree's leaf kinds when it was flattened in this process (see ``Flat.kinds``).
    kinds: str | None = None
    #: True when ``buffers`` is one buffer holding the whole data section (an arena).
    contiguous: bool = False
    #: Each tensor's bytes, in layout order, when the caller has them cut already.
    tensors: Sequence[Buffer] | None = None
    #: For data still arriving (a streamed arena): ``ready(n)`` returns once the first
    #: ``n`` bytes of the data section are there, or raises why they will not be.
    ready: Callable[[int], None] | None = None

    @classmethod
    def of_flat(cls, flat: Flat, previous: Layout | None = None) -> Payload:
        """Lay ``flat`` out; ``previous`` is reused when the shapes have not changed
        (planning, and encoding the header's tensor entries, cost per-array work)."""
        fits = previous is not None and previous.matches(flat.arrays)
        layout = previous if fits and previous is not None else Layout.plan(flat.arrays)
        # The arrays themselves: C-contiguous and little-endian (flatten sees to it), so
        # writev and the digest take them as they are, with no view made per array.
        buffers = tuple(map(flat.arrays.__getitem__, layout.names))
        return cls(layout, flat.structure, buffers, flat.kinds)

    @classmethod
    def of_arena(
        cls,
        layout: Layout,
        data: memoryview,
        structure: Any,
        tensors: Sequence[Buffer] | None = None,
        ready: Callable[[int], None] | None = None,
    ) -> Payload:
        """An arena's data section (``tensors``: views of it, per tensor, if kept;
        ``ready``: see the field)."""
        data = data[: layout.data_size]
        return cls(layout, structure, (data,), contiguous=True, tensors=tensors, ready=ready)

    def span(
        self, begin: int, end: int, pieces: Sequence[Buffer]
    ) -> tuple[Sequence[Buffer], Sequence[int]]:
        """The buffers holding tensors ``begin..end-1`` and their sizes, for one ``writev``:
        one slice of a contiguous payload, else the tensors' own ``pieces``."""
        sizes = self.layout.sizes[begin:end]
        if not self.contiguous:
            return pieces[begin:end], sizes
        first = self.layout.tensors[begin].begin
        total = sum(sizes)
        span = self.buffers[0][first : first + total]
        if span.nbytes != total:  # a layout out of offset order, or a short buffer
            raise ValueError(f"tensors {begin}..{end - 1} are not {total} bytes at {first}")
        return [span], [total]

    def tensor_bytes(self) -> Sequence[Buffer]:
        """Each tensor's bytes, in layout order (a list made in C: no generator frame per
        tensor, which cost a state of 20,000 arrays several ms)."""
        if self.tensors is not None:
            return self.tensors
        if not self.contiguous:
            return self.buffers
        (data,) = self.buffers
        return list(map(data.__getitem__, self.layout.slices))


def _template_for(payload: Payload, previous: Template | None = None) -> Template:
    """The header template of ``payload``: ``previous`` if it still fits, else a new one."""
    if previous is not None and previous.fits(payload.layout, payload.structure, payload.kinds):
        return previous
    return Template(payload.layout, payload.structure, payload.kinds)


def encode(
    payload: Payload, meta_fields: dict[str, Any], template: Template | None = None
) -> Encoded:
    """Prepare ``payload`` for :func:`write` (no copy of the data).

    ``template`` (a previous snapshot's) is used if it fits this payload, else a new one
    is made; ``Encoded.template`` is the one used, to keep for the next snapshot.
    """
    template = _template_for(payload, template)
    meta = Meta(structure=template.structure, **meta_fields)
    return Encoded(payload, template, meta, template.length(meta))


def write(directory: Path, final_name: str, encoded: Encoded) -> None:
    """Write ``encoded`` durably as ``directory/final_name`` (see the module docstring).

    Raises:
        CommitFailed: on any I/O error; nothing is left under either name.
        PeerError, ProtocolError: from ``payload.ready``, untranslated: streamed data
            stopped coming. Nothing is left under either name.
    """
    tmp = directory / f"{TMP_PREFIX}{final_name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        _write_temporary(tmp, encoded)
        crashpoint("commit.before_rename")
        os.rename(tmp, directory / final_name)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise CommitFailed(f"writing {final_name} failed: {exc}", str(directory)) from exc
    except (PeerError, ProtocolError):
        # Streamed data that stopped coming: the experiment's failure, not the store's.
        _unlink_quietly(tmp)
        raise
    except Exception as exc:  # a bug or a buffer changed under us: still fail cleanly
        _unlink_quietly(tmp)
        raise CommitFailed(
            f"writing {final_name} failed: {type(exc).__name__}: {exc}", str(directory)
        ) from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    crashpoint("commit.after_rename")
    try:
        fsync_directory(directory)
    except OSError as exc:
        # The file is visible but not known to be durable: withdraw it, never acknowledge.
        _unlink_quietly(directory / final_name)
        raise CommitFailed(
            f"fsync of {directory} failed: {exc}", str(directory), published=True
        ) from exc
    crashpoint("commit.after_fsync_dir")


def _write_temporary(path: Path, encoded: Encoded) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        crashpoint("commit.after_create")
        os.posix_fallocate(fd, 0, encoded.nbytes)
        # The data first, behind the room left for the header: its digests are taken
        # as it goes out, and the header, which holds them, comes last.
        os.lseek(fd, encoded.header_size, os.SEEK_SET)
        digests = _write_data(fd, encoded.payload, encoded.header_size)
        crashpoint("commit.after_data")
        header = encoded.template.render(encoded.meta, digests)
        if len(header) != encoded.header_size:
            raise RuntimeError(f"header of {len(header)} bytes, {encoded.header_size} planned")
        _pwrite_all(fd, header, 0)
        crashpoint("commit.before_fsync")
        os.fsync(fd)
        crashpoint("commit.after_fsync")
    finally:
        os.close(fd)


def _write_data(fd: int, payload: Payload, start: int) -> list[str]:
    """Write the data section at ``start`` (the file position); return the digests.

    Piece by piece (:func:`_pieces`): each piece is digested first, then written while
    its bytes are still in the CPU cache; then its writeback to the disk is started
    (``sync_file_range``), so the disk works while the next piece is digested and
    copied, and the final fsync finds little left to do.

    Digesting before writing matters for an experiment's freshly mapped shared memory:
    the digest's reads fault its pages in far faster than the kernel's copy inside
    ``writev`` does (measured: 64 MiB written in 16 ms instead of 47 ms).

    Data still arriving (``payload.ready``) goes in smaller pieces, each once it is
    there, so the digests and writes keep close behind the copy.

    Raises:
        OSError: the file could not be written.
        PeerError, ProtocolError: from ``payload.ready``: the rest is not coming.
    """
    tensors = payload.tensor_bytes()
    digests: list[str] = []
    streamed = digester()
    ready = payload.ready
    for piece in _pieces(payload.layout, IO_UNIT if ready is None else STREAM_UNIT):
        if ready is not None:
            ready(piece.end)
        big = piece.part_of
        if big is None:
            digests.extend(map(digest, tensors[piece.first : piece.last]))
            _write_all(fd, *payload.span(piece.first, piece.last, tensors))
        else:
            part = memoryview(tensors[piece.first]).cast("B")[
                piece.begin - big.begin : piece.end - big.begin
            ]
            if piece.begin == big.begin:
                streamed = digester()
            streamed.update(part)
            _write_all(fd, [part], [part.nbytes])
            if piece.end == big.end:
                digests.append(streamed.hexdigest())
        _writeback.start(fd, start + piece.begin, piece.end - piece.begin)
    return digests


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset``, resuming after short writes."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(f"pwrite wrote nothing with {view.nbytes} bytes to go")
        view, offset = view[written:], offset + written


#: Bytes of tensors read or written (and digested) as one group: big enough to keep the
#: disk's queue full between two starts of writeback, small enough to stay in the CPU
#: cache between the copy and the digest.
IO_UNIT = 8 << 20
#: The same for data still arriving: an experiment copies a streamed state in pieces of
#: this size, and the commit follows piece by piece (a model of it took 14-15 ms for
#: 20 MB in 1-2 MiB pieces, 22 ms in pieces of IO_UNIT; docs/PERFORMANCE.md).
STREAM_UNIT = 1 << 20


@dataclass(frozen=True, slots=True)
class _Piece:
    """``[begin, end)`` of the data section, written or read in one call: tensors
    ``first`` to ``last - 1`` whole, or a part of one tensor bigger than the unit of
    :func:`_pieces` (``part_of``, tensor ``first``)."""

    begin: int
    end: int
    first: int
    last: int
    part_of: Tensor | None = None

    @property
    def closes(self) -> bool:
        """True when no piece after this one belongs to the same tensor."""
        return self.part_of is None or self.end == self.part_of.end


def _pieces(layout: Layout, unit: int = IO_UNIT) -> list[_Piece]:
    """The writes and reads of a data section: the layout's groups of up to ``unit``
    bytes, in offset order, with tensors bigger than ``unit`` cut into parts of that size."""
    pieces = []
    for begin, end in layout.groups(unit):
        first, last = layout.tensors[begin], layout.tensors[end - 1]
        if end - begin > 1 or first.nbytes <= unit:
            pieces.append(_Piece(first.begin, last.end, begin, end))
        else:
            pieces.extend(
                _Piece(at, min(at + unit, first.end), begin, end, part_of=first)
                for at in range(first.begin, first.end, unit)
            )
    return pieces


_SYNC_FILE_RANGE_WRITE = 2
#: errnos that mean "no sync_file_range here" (not a failed write): stop calling it.
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE})


class _Writeback:
    """libc's ``sync_file_range`` (Linux; Python's os module does not have it), looked up
    on first use and given up for good where the kernel or file system does not support
    it: it is only a head start for the fsync that follows."""

    def __init__(self) -> None:
        self._call: Callable[[int, int, int, int], int] | None = None
        self._usable = True

    def start(self, fd: int, offset: int, nbytes: int) -> None:
        """Ask the kernel to start writing ``[offset, offset + nbytes)`` to the disk now.

        Raises:
            OSError: a write-back error, like any other I/O error of the commit.
        """
        call = self._function()
        if call is None or nbytes == 0:
            return
        if call(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0:
            return
        code = ctypes.get_errno()
        if code in _UNSUPPORTED:
            self._usable = False
            return
        if code in (errno.ENOMEM, errno.EINTR):  # no head start this time; fsync will do
            return
        raise OSError(code, f"sync_file_range: {os.strerror(code)}")

    def _function(self) -> Callable[[int, int, int, int], int] | None:
        if self._call is None and self._usable:
            try:
                function = ctypes.CDLL(None, use_errno=True).sync_file_range
            except (OSError, AttributeError):
                self._usable = False
                return None
            function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            function.restype = ctypes.c_int
            self._call = cast(Callable[[int, int, int, int], int], function)
        return self._call if self._usable else None


_writeback = _Writeback()


def _write_all(fd: int, buffers: Sequence[Buffer], sizes: Sequence[int]) -> None:
    """``writev`` every buffer, in batches of IOV_MAX, resuming after short writes.

    ``sizes`` are the buffers' byte sizes: a batch written whole (the usual case) moves on
    without looking at its buffers one by one.
    """
    start = 0
    while start < len(buffers):
        batch = buffers[start : start + _IOV_MAX]
        wanted = sum(sizes[start : start + _IOV_MAX])
        written = os.writev(fd, batch)
        if written == wanted:
            start += len(batch)
            continue
        _write_rest(fd, list(buffers[start:]), written)
        return


def _write_rest(fd: int, pending: list[Buffer], written: int) -> None:
    """After a short write: advance past what was written, then go on in batches of
    IOV_MAX, looking at each buffer's size (the fast path trusts the planned sizes)."""
    while True:
        pending = _advance(pending, written)
        if not pending:
            return
        batch = pending[:_IOV_MAX]
        written = os.writev(fd, batch)
        if written == 0:
            raise OSError(f"writev wrote nothing with {sum(b.nbytes for b in batch)} bytes to go")


def _advance(buffers: list[Buffer], written: int) -> list[Buffer]:
    """The part of ``buffers`` not covered by the first ``written`` bytes (empty ones dropped)."""
    index = 0
    while index < len(buffers) and written >= buffers[index].nbytes:
        written -= buffers[index].nbytes
        index += 1
    rest = buffers[index:]
    if written:
        rest[0] = memoryview(rest[0]).cast("B")[written:]
    return rest


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a rename, an unlink) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:  # best effort: the next writer removes leftover temporary files
        pass


@dataclass(frozen=True)
class Loaded:
    """A verified snapshot: its header and its arrays (views of one private buffer, or
    the arrays it was restored into)."""

    header: Header
    arrays: dict[str, np.ndarray[Any, Any]]

    def tree(self) -> Any:
        """The state tree, rebuilt from the structure."""
        return unflatten(self.header.meta.structure, self.arrays)


def read_header(path: Path) -> Header:
    """Read and validate only the header (cheap: no data is read).

    Raises:
        SnapshotCorrupt: the header is damaged or does not fit the file size.
        StoreError: the file cannot be opened (missing, not a regular file, no access).
    """
    with _open_regular(path) as (fd, size):
        return _header_from(fd, size, str(path))


def read(
    path: Path,
    into: Mapping[str, np.ndarray[Any, Any]] | None = None,
    check: Callable[[Header], None] | None = None,
) -> Loaded:
    """Read a whole snapshot and verify every digest before returning anything.

    ``into`` holds the arrays of the object being restored, by the names :func:`flatten`
    gives them (see :func:`arrays_of`). When they are exactly the snapshot's (names,
    shapes, dtypes), writable, contiguous, in numpy's own memory and apart, the data is
    restored into them: verified first through a read-only mapping of the file, then
    copied, so they change only once every digest matched and no second copy of the
    state is made. Otherwise the data is read into one fresh buffer. ``check`` sees the
    header before any data is read, and refuses a file by raising
    :class:`SnapshotCorrupt`.

    Restoring in place is for files that nobody changes once written, as a store's: a
    file truncated while it is mapped kills the reader with SIGBUS, and one rewritten in
    place between the check and the copy would hand over unchecked bytes.

    Raises:
        SnapshotCorrupt: any check failed; ``.reason`` says which. ``into`` is unchanged.
        StoreError: the file cannot be opened.
    """
    with _open_regular(path) as (fd, size):
        header = _header_from(fd, size, str(path))
        if check is not None:
            check(header)
        targets = _restorable(header.layout, into)
        if targets is not None and _restore_verified(fd, size, header, targets, str(path)):
            return Loaded(header, dict(zip(header.layout.names, targets, strict=True)))
        data = _read_verified(fd, header, str(path))
    return Loaded(header, header.layout.views(data))


def arrays_of(target: Target) -> dict[str, np.ndarray[Any, Any]] | None:
    """The arrays of ``target``'s current state by name (for :func:`read`'s ``into``);
    None when that state cannot be taken or must not be filled (``fillable_state``)."""
    try:
        state = fillable_state(target)
        return None if state is None else flatten(state).arrays
    except Exception:
        # The current state is only a place to put the data. An object whose state
        # cannot be taken now (built with __new__, its attributes not set yet) is
        # restored into fresh arrays, as before it had any.
        return None


class _open_regular:
    """Context manager: an fd opened with O_NOFOLLOW on a regular file, and its size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> tuple[int, int]:
        # O_NONBLOCK: opening a FIFO planted under a snapshot's name would otherwise wait
        # for a writer forever. It means nothing for a regular file's reads.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            self.fd = os.open(self.path, flags)
            info = os.fstat(self.fd)
        except OSError as exc:
            self.__exit__()
            raise StoreError(f"cannot open {self.path}: {exc.strerror}", str(self.path)) from exc
        if not stat.S_ISREG(info.st_mode):
            self.__exit__()
            raise StoreError(f"{self.path} is not a regular file", str(self.path))
        return self.fd, info.st_size

    def __exit__(self, *exc_info: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _header_from(fd: int, size: int, source: str) -> Header:
    length = header_length(os.pread(fd, 8, 0), size, source)
    region = os.pread(fd, 8 + length, 0)
    return decode_header(region, size, source)


def _restorable(
    layout: Layout, into: Mapping[str, np.ndarray[Any, Any]] | None
) -> list[np.ndarray[Any, Any]] | None:
    """The arrays of ``into`` in layout order, when the data can be copied into them."""
    targets = None if into is None else layout.ordered(into)
    if targets is None or not all(map(_fillable, targets)) or overlapping(targets):
        return None
    return targets


def _fillable(array: np.ndarray[Any, Any]) -> bool:
    """True when the stored bytes can be copied into ``array`` as they are, and into
    memory numpy allocated: not a view of a memory-mapped file (``np.memmap``), which
    the copy would rewrite on disk, nor of a foreign buffer."""
    flags = array.flags
    if not (flags.writeable and flags.c_contiguous and array.dtype.byteorder in _LITTLE_ORDERS):
        return False
    owner = array
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    return owner.base is None and type(owner) is np.ndarray


#: Byte orders whose arrays take the file's little-endian bytes unchanged.
_LITTLE_ORDERS = "<|=" if sys.byteorder == "little" else "<|"


def _restore_verified(
    fd: int, size: int, header: Header, targets: Sequence[np.ndarray[Any, Any]], source: str
) -> bool:
    """Check every digest of the file through a read-only mapping, then copy into
    ``targets`` (the layout's arrays, in its order); False if the file cannot be mapped.

    Copying out of the page cache in user space, in lanes, is faster than ``preadv``
    into memory that is already there: 1 GiB in 50 arrays, verified and copied on two
    cores, takes 0.10 s where the bare read takes 0.12 s. The mapping is shared and
    read-only; snapshotd never changes a committed file, it only renames and unlinks it,
    which leaves a mapping intact.

    Raises:
        SnapshotCorrupt: a digest does not match; ``targets`` are untouched.
    """
    try:
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except OSError:  # a file system that cannot map files: read it instead
        return False
    mapped.madvise(mmap.MADV_WILLNEED)
    _check_then_copy(mapped, header, targets, source)
    # Only here: on a mismatch the traceback still holds views of the mapping, and the
    # mapping goes when they do.
    mapped.close()
    return True


def _check_then_copy(
    mapped: mmap.mmap, header: Header, targets: Sequence[np.ndarray[Any, Any]], source: str
) -> None:
    """Both passes over the data on every usable CPU (:mod:`snapshotd.lanes`): every
    digest, and only once all match, every copy."""
    layout = header.layout
    view = np.frombuffer(mapped, np.uint8, layout.data_size, header.data_start).data
    slices = layout.slices
    parts = lanes.even_parts(layout.sizes, lanes.usable_cpus())

    def check(part: range) -> list[str]:
        return list(map(digest, map(view.__getitem__, slices[part.start : part.stop])))

    def copy(part: range) -> None:
        for target, where in zip(
            targets[part.start : part.stop], slices[part.start : part.stop], strict=True
        ):
            size = target.nbytes
            if size >= _COPY_WITHOUT_GIL:
                np.copyto(target.reshape(-1).view(np.uint8), np.frombuffer(view[where], np.uint8))
            elif size:  # an empty one has nothing to copy and cannot be cast
                target.data.cast("B")[:] = view[where]

    with lanes.Lanes(len(parts)) as pool:
        found = list(itertools.chain.from_iterable(pool.map(check, parts)))
        expected = header.ordered_digests
        if found != expected:
            _mismatch(layout, 0, found, expected, source)
        pool.map(copy, parts)


#: From this size on a tensor is copied with ``np.copyto``, which lets go of the GIL so
#: that the lanes copy at once; below it, byte to byte through memoryviews, which costs
#: less a call (20,000 tensors of 1 KiB: 11 ms instead of 28).
_COPY_WITHOUT_GIL = 64 << 10


def _read_verified(fd: int, header: Header, source: str) -> np.ndarray[Any, Any]:
    """Read the data section into one fresh buffer, checking every digest on the way.

    Piece by piece, as the writer wrote them (groups of tensors of about
    :data:`IO_UNIT` bytes; a bigger tensor in pieces of that size): each piece is
    digested right after it was read, while still in the CPU cache, instead of reading
    the whole section from memory a second time. The pieces are shared out in lanes of
    about equal bytes, one a usable CPU (:mod:`snapshotd.lanes`), which read and digest
    at once: 64 MiB in 8-11 ms instead of 12 on two cores. (Reading the next piece ahead
    in a helper thread while digesting this one was slower, 18 ms, and was dropped.)

    Raises:
        SnapshotCorrupt: the file ended early or a digest does not match.
    """
    layout = header.layout
    data = np.empty(layout.data_size, dtype=np.uint8)
    view = data.data
    expected = header.ordered_digests

    def read(pieces: Sequence[_Piece]) -> None:
        streamed = digester()
        for piece in pieces:
            _read_into(fd, view[piece.begin : piece.end], header.data_start + piece.begin, source)
            big = piece.part_of
            if big is None:
                found = list(
                    map(digest, map(view.__getitem__, layout.slices[piece.first : piece.last]))
                )
                if found != expected[piece.first : piece.last]:
                    _mismatch(layout, piece.first, found, expected[piece.first :], source)
                continue
            if piece.begin == big.begin:
                streamed = digester()
            streamed.update(view[piece.begin : piece.end])
            if piece.end == big.end and streamed.hexdigest() != expected[piece.first]:
                _mismatch(layout, piece.first, [""], expected[piece.first :], source)

    shares = _shares(layout, _pieces(layout))
    with lanes.Lanes(len(shares)) as pool:
        pool.map(read, shares)
    return data


def _shares(layout: Layout, pieces: Sequence[_Piece]) -> list[Sequence[_Piece]]:
    """``pieces`` in consecutive runs of about equal bytes, one a lane, when the layout's
    tensors are worth lanes (:func:`lanes.even_parts`); never parting the pieces of one
    tensor, whose digest is streamed over them in order."""
    cpus = lanes.usable_cpus()
    if len(lanes.even_parts(layout.sizes, cpus)) < 2:
        return [pieces]
    closing = [i for i, piece in enumerate(pieces) if piece.closes]
    runs = [pieces[i].end for i in closing]
    parts = lanes.even_parts([b - a for a, b in itertools.pairwise([0, *runs])], cpus, 0)
    bounds = [0, *(closing[part.stop - 1] + 1 for part in parts if part)]
    return [pieces[a:b] for a, b in itertools.pairwise(bounds)]


def _mismatch(
    layout: Layout, first: int, found: Sequence[str], expected: Sequence[str], source: str
) -> NoReturn:
    """Raise for the first tensor (from index ``first``) whose digest is not the expected."""
    bad = next(i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b)
    name = layout.tensors[first + bad].name
    raise SnapshotCorrupt(source, f"digest mismatch in tensor {name!r}")


def _read_into(fd: int, target: memoryview, offset: int, source: str) -> None:
    """Fill ``target`` with the file's bytes from ``offset`` (resuming after short reads)."""
    done = 0
    while done < target.nbytes:
        got = os.preadv(fd, [target[done:]], offset + done)
        if got == 0:
            raise SnapshotCorrupt(source, f"file ended {target.nbytes - done} bytes early")
        done += got


def save(
    path: str | os.PathLike[str],
    obj: object,
    *,
    step: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``obj``'s state to one snapshot file, atomically and durably.

    ``obj`` is an object with ``__getstate__``, a dict, or a plain state tree (a tuple or
    list). The file is a safetensors file any safetensors reader opens.

    Raises:
        StateError: the state holds something that cannot be stored (the path says where).
        CommitFailed: an I/O error; an existing file at ``path`` is left as it was.
    """
    target = Path(path)
    meta = _standalone_meta(target.stem, step, metadata)
    key = os.path.abspath(target)
    previous = _saved.get(key)
    with collector.paused():
        flat = flatten(state_of(obj))
        payload = Payload.of_flat(flat, previous.layout if previous is not None else None)
        encoded = encode(payload, meta, previous)
    _saved.put(key, encoded.template)
    write(target.parent, target.name, encoded)


#: The header templates of the files :func:`save` wrote last, by absolute path: saving
#: the same state to the same file again (a checkpoint every epoch) reuses its layout and
#: the header's prepared parts, as the store does per run. 20,000 arrays: 154 -> 43 ms.
_saved: Recent[str, Template] = Recent(4)


def _standalone_meta(
    name: str, step: int | None, metadata: Mapping[str, str] | None
) -> dict[str, Any]:
    return {
        "name": name,
        "version": 0,
        "step": step,
        "created": datetime.now(UTC),
        "user": user_metadata(metadata),
    }


def user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Check that user metadata maps str to str; return a copy."""
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UsageError(f"metadata must map str to str; got {key!r}: {value!r}")
    return dict(metadata or {})


def load(path: str | os.PathLike[str], into: object = None) -> Any:
    """Read and verify one snapshot file.

    Without ``into``, return the state tree. With ``into``, restore it into that object
    (``__setstate__``, or in place for a dict) and return ``into``. A file named by path
    may be changed by other programs at any time, so it is read into fresh memory and
    verified there (a store's files can be restored in place: :func:`restore_into`).

    Raises:
        SnapshotCorrupt: the file fails verification; nothing is restored.
        RestoreMismatch: the stored names do not fit the dict ``into``.
    """
    tree = read(Path(path)).tree()
    if into is None:
        return tree
    adapt(into).set_state(tree)
    return into


def restore_into(
    target: Target,
    reader: Callable[[Mapping[str, Any] | None], Loaded],
    in_place: bool = False,
) -> Loaded:
    """Restore ``target`` from what ``reader`` reads (given the arrays to fill, or None);
    return that.

    With ``in_place``, ``target``'s arrays are filled where its current state has the
    snapshot's arrays (names, shapes, dtypes), each writable, contiguous, in numpy's own
    memory and sharing none with another (see :func:`read`): the restore needs no memory
    for a second copy, and other references to those arrays see the restored values.
    That is for targets whose ``__getstate__`` returns their own arrays and whose
    ``__setstate__`` keeps them: an array it hands out but does not own (a class-level
    default, another model's) would be overwritten, and if ``__setstate__`` then raises,
    the arrays already hold the restored (verified) values. A dict target and callables
    without ``set=`` are never filled before their own checks. Then the tree goes to
    ``__setstate__`` (or ``set=``, or into the dict) as usual.
    """
    with collector.paused():
        # Taking the state and rebuilding the tree make a container or two per array.
        loaded = reader(arrays_of(target) if in_place else None)
        tree = loaded.tree()
    target.set_state(tree)
    return loaded
