"""Posts a 4 MB body to ingest with Python's urllib, which writes the whole body before it reads
the answer, and prints what came back: one JSON line per route."""

import json
import sys
import urllib.error
import urllib.request

base = sys.argv[1]
content = "x" * 4_000_000
body = json.dumps(
    {"user_id": "big", "model": "sim", "messages": [{"role": "user", "content": content}]}
).encode()
for path in ("/v1/jobs", "/v1/chat/completions"):
    request = urllib.request.Request(
        base + path, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(json.dumps({"path": path, "status": response.status, "body": json.load(response)}))
    except urllib.error.HTTPError as error:
        print(json.dumps({"path": path, "status": error.code, "body": json.load(error)}))
    except OSError as error:
        print(json.dumps({"path": path, "error": repr(error)}))
