"""``shmcache`` / ``python -m shmcache``: one command for the host's tools.

    shmcache serve [supervisor options]     run a host (= python -m shmcache.supervisor)
    shmcache stats [--port 8001] [--watch]  a host's figures (= python -m shmcache.stats)
    shmcache segments [--prune]             the host's segments (= python -m shmcache.segments)
    shmcache --version
"""

import sys

from . import __version__

COMMANDS = {
    "serve": ("shmcache.supervisor", "run a host: a supervisor, its workers and the arena "
                                     "(the options of python -m shmcache.supervisor)"),
    "stats": ("shmcache.stats", "print a running host's figures as a table"),
    "segments": ("shmcache.segments", "list the host's shared-memory segments; remove or "
                                      "prune the ones nobody uses"),
}

USAGE = "usage: shmcache [--version] [--help] COMMAND [options]\n"


def _help():
    lines = [USAGE, "A groupcache-style cache whose host tier lives in shared memory.\n",
             "commands:"]
    lines += [f"  {name:10} {text}" for name, (_module, text) in COMMANDS.items()]
    lines += ["", "shmcache COMMAND --help describes a command's options."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"shmcache {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        sys.stderr.write(f"{USAGE}shmcache: error: unknown command {argv[0]!r} "
                         f"(choose from {', '.join(COMMANDS)})\n")
        return 2
    import importlib
    module = importlib.import_module(command[0])
    code = module.main(argv[1:])          # the supervisor exits itself; the others return
    return 0 if code is None else code


if __name__ == "__main__":
    sys.exit(main())
