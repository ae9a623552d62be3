"""The plainest Python extension, the yardstick of the cold-start benchmark.

It registers for INVOKE and SHUTDOWN with http.client and loops on /event/next until
SHUTDOWN, as an extension that does nothing else would: the cost of a Python extension
that the layer's start-up is compared with (bench/coldstart.py). It serves nothing.

    python3 -E -s -S -u -m minimal_extension NAME     (AWS_LAMBDA_RUNTIME_API set)
"""

import http.client
import json
import os
import sys


def main(argv):
    name = argv[1] if len(argv) > 1 else "minimal-extension"
    host, _, port = os.environ["AWS_LAMBDA_RUNTIME_API"].rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=None)
    connection.request("POST", "/2020-01-01/extension/register",
                       body=json.dumps({"events": ["INVOKE", "SHUTDOWN"]}),
                       headers={"Lambda-Extension-Name": name, "Content-Type": "application/json"})
    response = connection.getresponse()
    identifier = response.getheader("Lambda-Extension-Identifier")
    response.read()
    while True:
        connection.request("GET", "/2020-01-01/extension/event/next",
                           headers={"Lambda-Extension-Identifier": identifier})
        event = json.loads(connection.getresponse().read())
        if event.get("eventType") == "SHUTDOWN":
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
