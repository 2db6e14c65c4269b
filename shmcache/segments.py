"""``python -m shmcache.segments``: list the shmcache segments of this host, remove them.

A segment's *state*, read from its header and its owner lock (arena.py, supervisor.py):

    state     meaning                                                      --prune removes
    serving   a running supervisor owns it (it holds the owner lock)       never
    dead      its supervisor died without a clean stop: nobody serves or   yes
              repairs it, the next supervisor of that name discards it
    kept      a supervisor stopped with --warm-restart and kept it          with --kept
    embedded  made by shmcache.create() (no supervisor); in use while any  when no process
              process maps it                                              maps it
    creating  a half-made segment (``<name>.creating-<pid>``)              if its creator died

Files in the directory that are not shmcache segments are never touched. Removing a
segment removes its name; processes that still map it keep their mapping, and the memory
goes back to the system when the last one lets go.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

from .arena import _CREATING, _U32, _U64, pid_alive, retire, shm_dir
from .layout import HEADER, HEADER_BYTES, MAGIC, OWNER_LOCK_BYTE
from .errors import SegmentIncompatible, SegmentNotFound
from .locks import LockFile
from .units import format_size


@dataclass
class SegmentInfo:
    name: str
    size: int
    state: str                 # serving, dead, kept, embedded, creating
    owner_pid: int             # the supervisor recorded as owner (0: none)
    creator_pid: int
    clean: bool                # the clean-stop mark (a warm restart may re-attach)
    items: int | None          # None when the index could not be read
    mapped_by: list            # pids of processes that map it now

    @property
    def removable(self):
        """Whether --prune removes it (without --kept)."""
        if self.state in ("dead", "creating"):
            return True
        return self.state == "embedded" and not self.mapped_by


def _mappers():
    """{(device, inode) of a mapped file: [pids]} for every process this user may inspect.
    By inode, not path: a segment is mapped under its temporary name (arena.py), and the
    maps of a process show the name a file had when it was mapped."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as maps:
                for line in maps:
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[4] != "0":
                        major, minor = fields[3].split(":")
                        key = (os.makedev(int(major, 16), int(minor, 16)), int(fields[4]))
                        found.setdefault(key, set()).add(int(entry))
        except (OSError, ValueError):   # gone meanwhile, or not ours to read
            continue
    return {key: sorted(pids) for key, pids in found.items()}


def _mapped_by(mappers, st):
    return mappers.get((st.st_dev, st.st_ino), [])


def inspect(name, directory=None, mappers=None):
    """SegmentInfo of the file ``name``, or None if it is not a shmcache segment."""
    directory = directory or shm_dir()
    path = os.path.join(directory, name)
    mappers = _mappers() if mappers is None else mappers
    stem, creating, pid = name.partition(_CREATING)
    if creating:
        if not (pid.isascii() and pid.isdigit()):       # "²" is a digit to isdigit()
            return None
        st = os.stat(path)
        return SegmentInfo(name, st.st_size, "creating", 0, int(pid), False, None,
                           _mapped_by(mappers, st))
    try:
        lock_file = LockFile(path)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    try:
        header = os.pread(lock_file.fd, HEADER_BYTES, HEADER.magic)
        if len(header) < HEADER_BYTES or _U64.unpack_from(header, HEADER.magic)[0] != MAGIC:
            return None
        st = os.fstat(lock_file.fd)
        creator = _U32.unpack_from(header, HEADER.creator_pid)[0]
        owner = _U32.unpack_from(header, HEADER.owner_pid)[0]
        clean = bool(_U32.unpack_from(header, HEADER.clean)[0])
        owned = lock_file.is_locked_elsewhere(OWNER_LOCK_BYTE)
    finally:
        lock_file.close()
    if owned:
        state = "serving"
    elif owner:
        state = "dead"
    elif clean:
        state = "kept"
    else:
        state = "embedded"
    return SegmentInfo(name, st.st_size, state, owner, creator, clean, _items(name),
                       _mapped_by(mappers, st))


def _items(name):
    from .store import Store
    try:
        store = Store.attach(name)
    except (SegmentIncompatible, SegmentNotFound, OSError, ValueError):
        return None
    try:
        return sum(info["items"] for info in store.index.groups().values())
    finally:
        store.close()


def list_segments(directory=None):
    """Every shmcache segment in ``directory`` (default: the shm directory), by name."""
    directory = directory or shm_dir()
    mappers = _mappers()
    found = []
    for entry in sorted(os.listdir(directory)):
        try:
            info = inspect(entry, directory, mappers)
        except OSError:                 # removed while we looked
            continue
        if info is not None:
            found.append(info)
    return found


def remove(info, directory=None):
    """Remove the segment's name, marking it retired first so that clients still attached
    stop writing into it (arena.retire). The caller decided it may go."""
    path = os.path.join(directory or shm_dir(), info.name)
    try:
        try:
            retire(path)
        except PermissionError:         # another user's: the unlink says what is possible
            pass
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _table(segments):
    if not segments:
        return "no shmcache segments\n"
    rows = [("NAME", "SIZE", "STATE", "OWNER", "CLEAN", "ITEMS", "MAPPED BY")]
    for info in segments:
        owner = "-"
        if info.owner_pid:
            owner = f"{info.owner_pid} ({'alive' if pid_alive(info.owner_pid) else 'dead'})"
        elif info.state in ("embedded", "creating"):
            owner = (f"creator {info.creator_pid} "
                     f"({'alive' if pid_alive(info.creator_pid) else 'dead'})")
        rows.append((info.name, format_size(info.size), info.state, owner,
                     "yes" if info.clean else "no", "?" if info.items is None else str(info.items),
                     ",".join(map(str, info.mapped_by[:6])) + ("..." if len(info.mapped_by) > 6
                                                               else "") or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n"
                   for row in rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m shmcache.segments",
        description="List the shmcache shared-memory segments of this host and remove the "
                    "ones nobody uses. With no option, prints one line per segment: name, "
                    "size, state (serving, dead, kept, embedded, creating), owner pid and "
                    "whether it is alive, the clean-stop mark, items, and the pids that map it. "
                    "Segments live in /dev/shm, or in $SHMCACHE_SHM_DIR when it is set.",
        epilog="Exit status: 0 done; 1 a segment was not removed (owner alive, or not found); "
               "2 bad command line.")
    parser.add_argument("--json", action="store_true",
                        help="print the list as JSON instead of a table")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--remove", metavar="NAME", action="append", default=[],
                        help="remove the segment NAME (repeatable); refused while a supervisor "
                             "serves it or a process maps it, unless --force")
    action.add_argument("--prune", action="store_true",
                        help="remove every segment whose owner is dead: dead ones, embedded ones "
                             "no process maps, and half-made ones whose creator died")
    parser.add_argument("--kept", action="store_true",
                        help="with --prune: also remove segments kept for a warm restart")
    parser.add_argument("--force", action="store_true",
                        help="with --remove: remove even a segment in use (its users keep their "
                             "mapping; a serving supervisor goes on with a segment no new "
                             "process can attach)")
    args = parser.parse_args(argv)
    if args.kept and not args.prune:
        parser.error("--kept goes with --prune")
    if args.force and not args.remove:
        parser.error("--force goes with --remove")
    return args


def main(argv=None):
    args = parse_args(argv)
    directory = shm_dir()
    if not os.path.isdir(directory):
        print(f"error: no directory {directory}", file=sys.stderr)
        return 1
    code = 0
    if args.remove:
        mappers = _mappers()
        for name in args.remove:
            info = inspect(name, directory, mappers) if os.path.exists(
                os.path.join(directory, name)) else None
            if info is None:
                print(f"error: no shmcache segment {name!r} in {directory}", file=sys.stderr)
                code = 1
                continue
            busy = info.state == "serving" or (info.mapped_by and info.state != "dead")
            if busy and not args.force:
                why = (f"supervisor pid {info.owner_pid} serves it" if info.state == "serving"
                       else f"pids {','.join(map(str, info.mapped_by))} map it")
                print(f"error: segment {name} is in use ({why}); stop it first, or use --force",
                      file=sys.stderr)
                code = 1
                continue
            if remove(info, directory):
                print(f"removed segment {name} ({format_size(info.size)}, {info.state})")
        return code
    segments = list_segments(directory)
    if args.prune:
        pruned = 0
        for info in segments:
            if info.removable or (args.kept and info.state == "kept"):
                if remove(info, directory):
                    pruned += 1
                    print(f"removed segment {info.name} ({format_size(info.size)}, {info.state})")
        print(f"pruned {pruned} segment{'s' if pruned != 1 else ''}")
        return 0
    if args.json:
        print(json.dumps([asdict(info) for info in segments], indent=2))
    else:
        sys.stdout.write(_table(segments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
