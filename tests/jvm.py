"""What a running TorchServe's JVM says its memory bounds are, and what a config's `vmargs` asks for."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def size_bytes(text: str) -> int:
    """A JVM size ("384m", "1g", "65536") in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", text.lower()).groups()
    return int(number) * UNITS[unit]


def asked(vmargs: str) -> dict[str, int | bool]:
    """The bounds a `vmargs` line sets, in the names `jcmd VM.flags` reports them under (MaxDirectMemorySize 0:
    not set, so the JVM allows as much direct memory as heap; ExitOnOutOfMemoryError, AlwaysPreTouch False: not
    set; InitialHeapSize absent: not set, the JVM picks it from the machine)."""
    bounds: dict[str, int | bool] = {"MaxDirectMemorySize": 0, "ExitOnOutOfMemoryError": False,
                                     "AlwaysPreTouch": False}
    for arg in vmargs.split():
        if arg.startswith("-Xmx"):
            bounds["MaxHeapSize"] = size_bytes(arg[4:])
        elif arg.startswith("-Xms"):
            bounds["InitialHeapSize"] = size_bytes(arg[4:])
        elif arg.startswith("-XX:MaxDirectMemorySize="):
            bounds["MaxDirectMemorySize"] = size_bytes(arg.split("=", 1)[1])
        elif arg in ("-XX:+ExitOnOutOfMemoryError", "-XX:+AlwaysPreTouch"):
            bounds[arg[5:]] = True
    return bounds


def running(pid: int) -> dict[str, int | bool]:
    """The same bounds as the JVM of `pid` holds them (`jcmd <pid> VM.flags` of the JDK running it): what the
    JVM took, not only what its command line asked for."""
    jcmd = Path(os.readlink(f"/proc/{pid}/exe")).with_name("jcmd")
    out = subprocess.run([str(jcmd), str(pid), "VM.flags"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    flags = {name: value if value else sign == "+"
             for sign, name, value in re.findall(r"-XX:([+-]?)(\w+)(?:=(\S+))?", out)}
    return {"MaxHeapSize": int(flags["MaxHeapSize"]), "InitialHeapSize": int(flags["InitialHeapSize"]),
            "MaxDirectMemorySize": int(flags.get("MaxDirectMemorySize", 0)),
            "ExitOnOutOfMemoryError": bool(flags.get("ExitOnOutOfMemoryError", False)),
            "AlwaysPreTouch": bool(flags.get("AlwaysPreTouch", False))}


def command_line(pid: int) -> dict[str, int | bool]:
    """The bounds on the command line of the running JVM `pid` (where jcmd cannot attach: a JVM in another user
    namespace, as a pod's is when the suite runs unprivileged)."""
    return asked(" ".join(Path(f"/proc/{pid}/cmdline").read_text().split("\0")))
