"""A TCP proxy for fault specs: listens on 127.0.0.1:LISTEN and forwards every connection to
127.0.0.1:UPSTREAM. Prints "ready PORT" once listening (LISTEN 0 picks a free port).
Stop it reading (a stalled peer) with SIGSTOP, resume with SIGCONT; SIGUSR1 cuts every link
it carries (both sides see the connection reset); SIGTERM ends it.
Usage: /usr/bin/python3 proxy.py LISTEN UPSTREAM"""
import signal
import socket
import sys
import threading

links = []  # every socket of every link, so SIGUSR1 can cut them all


def cut(signum, frame):
    for s in list(links):
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.shutdown(socket.SHUT_RDWR)  # wakes the pump thread blocked on it
            s.close()  # linger 0: a reset where data was still unread
        except OSError:
            pass
    links.clear()


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
    signal.signal(signal.SIGUSR1, cut)
    print("ready", server.getsockname()[1], flush=True)
    while True:
        try:
            client, _ = server.accept()
        except InterruptedError:
            continue
        broker = socket.create_connection(("127.0.0.1", upstream))
        links.extend((client, broker))
        for a, b in ((client, broker), (broker, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main()
