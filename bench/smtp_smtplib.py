#!/usr/bin/env python3
"""The SMTP baseline of issue 6: Python's smtplib sending N messages on one connection.

usage: python3 bench/smtp_smtplib.py HOST:PORT N
"""
import smtplib
import sys
import time
from email.message import EmailMessage


def main() -> None:
    addr = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8025"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    host, port = addr.rsplit(":", 1)
    start = time.perf_counter()
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        for i in range(n):
            m = EmailMessage()
            m["From"] = "Call Bot <calls@example.com>"
            m["To"] = "sales@example.com"
            m["Subject"] = f"Call from Tyler #{i}"
            m.set_content(f"Tyler asked to book an appointment.\n\nDuration: 44s\nMessage {i}\n")
            m.add_alternative(f"<p>Tyler asked to book an appointment. #{i}</p>", subtype="html")
            s.send_message(m)
    secs = time.perf_counter() - start
    print(f"python-smtplib: {n} messages in {secs:.3f} s = {n / secs:.0f} messages/s, "
          f"{secs * 1000 / n:.2f} ms/message")


if __name__ == "__main__":
    main()
