"""An HTTPS peer for callnotify's tests: a TLS listener on 127.0.0.1 presenting CERT.

Usage: python3 https_peer.py CERT KEY
Prints "READY <port>", then for each connection one line: "handshake ok" or
"handshake failed: <reason>". Answers any request that gets through with 200. Exits when stdin
closes.
"""
import socket
import ssl
import sys
import threading


def serve(listener, ctx):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    print("handshake ok", flush=True)
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            except (ssl.SSLError, OSError) as e:
                print(f"handshake failed: {e}", flush=True)


def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print(f"READY {listener.getsockname()[1]}", flush=True)
    threading.Thread(target=serve, args=(listener, ctx), daemon=True).start()
    sys.stdin.read()
    listener.close()


if __name__ == "__main__":
    main()
