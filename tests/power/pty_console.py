"""A console server port for tests: `python pty_console.py PORT` serves a shell on a
pseudo-terminal (the node's serial line) at 127.0.0.1:PORT, one connection at a
time, as a terminal server's port does.  Prints READY when listening."""

from __future__ import annotations

import os
import pty
import select
import socket
import sys


def main() -> None:
    port = int(sys.argv[1])
    pid, master = pty.fork()
    if pid == 0:
        os.environ.update(PS1="node$ ", TERM="dumb")
        os.execvp("sh", ["sh", "-i"])
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1)
    print("READY", flush=True)
    conn = None
    while True:
        fds = [srv, master] + ([conn] if conn else [])
        ready, _, _ = select.select(fds, [], [])
        if srv in ready:
            c, _ = srv.accept()
            if conn is None:
                conn = c
            else:
                c.close()  # the line is taken
        if master in ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                return  # the shell exited
            if conn:
                try:
                    conn.sendall(data)
                except OSError:
                    conn = None
        if conn and conn in ready:
            data = conn.recv(4096)
            if not data:
                conn.close()
                conn = None
            else:
                os.write(master, data)


if __name__ == "__main__":
    main()
