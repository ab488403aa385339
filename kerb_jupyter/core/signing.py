"""The notebook's half of the broker protocol: a SigV4-signed sts:GetCallerIdentity, sent as JSON.

The broker (``broker.auth``) checks the same headers and body; both sides take these constants from here.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any
from urllib.parse import urlsplit

AUDIENCE_HEADER = "x-kerb-jupyter-audience"
NONCE_HEADER = "x-kerb-jupyter-nonce"
STS_BODY = "Action=GetCallerIdentity&Version=2011-06-15"


def sign_request(credentials: Any, region: str, sts_url: str, audience: str) -> dict[str, Any]:
    """The notebook's side: a signed GetCallerIdentity for ``audience`` with a fresh nonce, as the JSON payload.

    ``credentials`` are botocore credentials (``boto3.Session().get_credentials()``). Every request carries a
    random nonce inside the signed part: SigV4 dates have one-second resolution, so two requests in the same
    second would otherwise be identical and the second refused as a replay.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    request = AWSRequest(method="POST", url=sts_url, data=STS_BODY.encode(), headers={
        "Host": urlsplit(sts_url).netloc,
        "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
        AUDIENCE_HEADER: audience,
        NONCE_HEADER: secrets.token_urlsafe(24),
    })
    SigV4Auth(credentials.get_frozen_credentials() if hasattr(credentials, "get_frozen_credentials")
              else credentials, "sts", region).add_auth(request)
    prepared = request.prepare()
    return {
        "headers": {k: str(v) for k, v in prepared.headers.items()},
        "body": base64.b64encode(STS_BODY.encode()).decode(),
    }
