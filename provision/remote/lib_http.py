# lib_http: the one HTTP probe of the remote programs (stdlib only, python 3.7+). A raw socket:
# urllib would double the fact gatherer's start-up time, and it would use a proxy.
import select
import socket
import time


def split_url(url):
    """("HOST[:PORT]", "/PATH") of a plain-HTTP URL."""
    hostport, _, path = url.split("://", 1)[1].partition("/")
    return hostport, "/" + path


def http_get(where, path, host, header="", timeout=5.0, waiting=None):
    """GET ``path`` from ``where`` ("HOST[:PORT]", or the path of a unix socket), with the Host header
    ``host``, straight (never through a proxy, no redirect followed). Returns (status, the value of
    the response header ``header`` or ""); status 0 when what answered does not speak HTTP.
    Raises OSError when nothing answers within ``timeout`` seconds; ``waiting``, if given, is
    called each 0.1 s without an answer (it may raise)."""
    deadline = time.time() + timeout
    if where.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(where)
        except OSError:
            sock.close()
            raise
    else:
        name, _, port = where.partition(":")
        sock = socket.create_connection((name, int(port or 80)), timeout=timeout)
    try:
        sock.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: provision\r\nConnection: close\r\n\r\n"
                      % (path, host)).encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            left = deadline - time.time()
            if left <= 0:
                raise socket.timeout("no answer within %ss" % timeout)
            if select.select([sock], [], [], min(0.1, left))[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            elif waiting:
                waiting()
    finally:
        sock.close()
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = lines[0].split()
    if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
        return 0, ""
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (l.partition(":") for l in lines[1:]))
    return int(status[1]), headers.get(header.lower(), "") if header else ""
