"""A real SMTP server for callnotify's tests: aiosmtpd on 127.0.0.1.

Usage: python3 smtp_server.py DIR [CERT KEY]
With CERT and KEY the server requires STARTTLS and presents that certificate.
Prints "READY <port>" once listening. Each accepted message is parsed with Python's standard
`email` package and written to DIR/<n>.json (envelope, decoded headers, MIME parts) next to the
raw DIR/<n>.eml. The file DIR/mode, read on every message, picks the answer to DATA:
"ok" (default), "4xx" (451, transient) or "5xx" (550, permanent). A recipient whose local part
starts with "unknown" is refused with 550 (user unknown). AUTH PLAIN and LOGIN are offered
(without TLS too); the file DIR/logins, if there, holds the "user:password" lines it accepts
(every login is refused with 535 otherwise), and each login tried is appended to
DIR/logins.tried as "user ok" or "user refused". Exits when stdin closes.
"""
import email
import email.header
import email.policy
import json
import os
import socket
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Handler:
    def __init__(self, out):
        self.out = out
        self.n = 0
        self.lock = threading.Lock()

    def mode(self):
        try:
            with open(os.path.join(self.out, "mode")) as f:
                return f.read().strip()
        except FileNotFoundError:
            return "ok"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode()
        given = f"{user}:{auth_data.password.decode()}"
        try:
            with open(os.path.join(self.out, "logins")) as f:
                ok = given in f.read().split()
        except FileNotFoundError:
            ok = False
        with self.lock, open(os.path.join(self.out, "logins.tried"), "a") as f:
            f.write(f"{user} {'ok' if ok else 'refused'}\n")
        return AuthResult(success=ok, handled=False)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.split("@")[0].startswith("unknown"):
            return "550 5.1.1 User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        mode = self.mode()
        if mode == "4xx":
            return "451 4.3.0 Try again later"
        if mode == "5xx":
            return "550 5.7.1 Message rejected"
        raw = envelope.original_content or envelope.content
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        parts = []
        for part in msg.walk():
            if part.is_multipart():
                continue
            parts.append({"type": part.get_content_type(), "body": part.get_content()})
        summary = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "headers": [[k, str(v)] for k, v in msg.items()],
            "subject": str(msg["subject"]),
            "content_type": msg.get_content_type(),
            "defects": [str(d) for d in msg.defects],
            "parts": parts,
        }
        with self.lock:
            self.n += 1
            n = self.n
        with open(os.path.join(self.out, f"{n}.eml"), "wb") as f:
            f.write(raw)
        tmp = os.path.join(self.out, f"{n}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f)
        os.rename(tmp, os.path.join(self.out, f"{n}.json"))
        return "250 2.0.0 OK"


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tls = {}
    if len(sys.argv) == 4:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[2], sys.argv[3])
        tls = {"tls_context": ctx, "require_starttls": True}
    handler = Handler(out)
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        authenticator=handler.authenticate,
        auth_require_tls=False,
        **tls,
    )
    controller.start()
    print(f"READY {port}", flush=True)
    sys.stdin.read()
    controller.stop()


if __name__ == "__main__":
    main()
