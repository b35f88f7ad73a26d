# lib_logtime: the time of an nginx log line (stdlib only, python 3.7+), as UTC epoch seconds.
# The access log (combined format): `ADDR - USER [24/Nov/2026:05:00:00 +0000] "GET / HTTP/1.1" 200 ...`;
# the error log: `2026/11/24 05:00:00 [error] ...`, in the host's local time.
import calendar
import time

MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}


def access_time(line):
    """The epoch seconds of a combined-format line, or None. The time is the [...] just before the quoted
    request: $remote_user before it (any Basic authorization's user name) may hold brackets, never a
    quote (nginx writes it \\x22)."""
    end = line.find('] "')
    start = line.rfind("[", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    try:
        stamp, zone = line[start + 1:end].split(" ")
        day, month, rest = stamp.split("/")
        year, hh, mm, ss = rest.split(":")
        sign = -1 if zone[0] == "-" else 1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[3:5]) * 60)
        return calendar.timegm((int(year), MONTHS[month], int(day), int(hh), int(mm), int(ss))) - offset
    except (ValueError, KeyError, IndexError):
        return None


def error_time(line):
    """The epoch seconds of an error-log line (host local time), or None."""
    try:
        return time.mktime(time.strptime(line[:19], "%Y/%m/%d %H:%M:%S"))
    except ValueError:
        return None


def line_time(line):
    return access_time(line) if line[:1] != "2" or line[4:5] != "/" else error_time(line)


def access_status(line):
    """The status of a combined-format line (the number after the quoted request), or None."""
    end = line.find('" ', line.find("] \""))
    if end < 0:
        return None
    word = line[end + 2:end + 5]
    return int(word) if word.isdigit() else None
