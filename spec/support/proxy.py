"""A TCP proxy for fault specs: listens on 127.0.0.1:LISTEN and forwards every connection to
127.0.0.1:UPSTREAM. Prints "ready PORT" once listening (LISTEN 0 picks a free port).
Stop it reading (a stalled peer) with SIGSTOP, resume with SIGCONT, end it with SIGTERM.
Usage: /usr/bin/python3 proxy.py LISTEN UPSTREAM"""
import socket
import sys
import threading


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main():
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen))
    server.listen(16)
    print("ready", server.getsockname()[1], flush=True)
    while True:
        client, _ = server.accept()
        broker = socket.create_connection(("127.0.0.1", upstream))
        for a, b in ((client, broker), (broker, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main()
