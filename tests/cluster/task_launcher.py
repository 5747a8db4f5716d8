"""Stand-in for slurmstepd: starts the tasks of a job step as its children (one process group), ignores the job's
signals itself, waits, and writes the tasks' exit codes. Usage: python task_launcher.py SPEC.json"""

import json
import signal
import subprocess
import sys

spec = json.load(open(sys.argv[1]))
for sig in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, lambda *_: None)  # a handler, not SIG_IGN: the tasks start with the default disposition
procs = [
    subprocess.Popen(spec["args"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=spec["cwd"])
    for env, log in zip(spec["envs"], spec["logs"], strict=True)
]
codes = [p.wait() for p in procs]
json.dump(codes, open(spec["codes"], "w"))
