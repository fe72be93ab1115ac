"""A rollout's synthetic load: RATE_PER_S requests per second of METHOD URL with HEADERS, forever.

Each request on a new connection, as a caller's would be; answers are read and dropped (the rollout's
gate judges them from Envoy's metrics). Standard library only (Python 3.9).
"""

import http.client
import json
import os
import time
import urllib.parse


def main() -> None:
    url = urllib.parse.urlsplit(os.environ["URL"])
    headers = {"Host": url.netloc, **json.loads(os.environ["HEADERS"])}
    interval = 1 / float(os.environ["RATE_PER_S"])
    next_at = time.monotonic()
    while True:
        connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=5)
        try:
            connection.request(os.environ["METHOD"], url.path or "/", headers=headers)
            connection.getresponse().read()
        except (OSError, http.client.HTTPException):
            pass  # a failed request is the gate's to judge, from the metrics
        finally:
            connection.close()
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


if __name__ == "__main__":
    main()
