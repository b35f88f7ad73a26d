# Runs on the managed host (stdlib python3, after lib_nginx): the reload (or restart) of a service with
# a master process, for the Service step. argv[1] is JSON: service, action (a systemctl verb),
# pid_file (the master's). Returns once the master's old workers are gone.
import json
import sys

a = json.loads(sys.argv[1])
res = reload_and_drain(a["pid_file"], a["action"], a["service"])
sys.stdout.write(res.stdout)
sys.exit(res.returncode)
