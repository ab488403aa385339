"""What each KDC refusal means for the broker: reason codes, every KDC and library error code mapped on purpose to a
permanent refusal or a retryable outage (``OUTAGES``), and the one-line message naming what to change."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.tickets import KDC_UNREACHABLE

# Refusal reasons (permanent: the notebook shows them and does not retry).
USER_NOT_DELEGABLE = "user_not_delegable"
ACCOUNT_DISABLED = "account_disabled"
SERVICE_NOT_ALLOWED = "service_not_allowed"
BROKER_NOT_TRUSTED = "broker_not_trusted"
UNKNOWN_PRINCIPAL = "unknown_principal"
SERVICE_UNKNOWN = "service_unknown"
KDC_REFUSED = "kdc_refused"  # any other refusal: the message names the KDC's code
DELEGATION = "delegation"  # not a reason: told apart by the evidence ticket (issue.py's docstring)
# Outages (the whole request gets 503; retrying later may work).
KDC_UNAVAILABLE = "kdc_unreachable"
BROKER_TICKET = "broker_ticket"  # the broker's own TGT was refused: fetched again on the next request
BROKER_KEY = "credentials_rejected"  # the broker's keytab no longer matches its account
CLOCK_SKEW = "clock_skew"
OUTAGES = frozenset({KDC_UNAVAILABLE, BROKER_TICKET, BROKER_KEY, CLOCK_SKEW})

_KRB5 = -1765328384  # ERROR_TABLE_BASE_krb5 (signed), as GSSAPI's minor status and krb5's err_code carry it


@dataclass(frozen=True)
class KdcError:
    """How one KDC error code is answered: ``reason`` (or ``at_self`` when S4U2Self got it)."""

    name: str
    reason: str
    at_self: str | None = None


_PKINIT = ("KDC_ERROR_CLIENT_NOT_TRUSTED", "KDC_ERROR_KDC_NOT_TRUSTED", "KDC_ERROR_INVALID_SIG",
           "KDC_ERR_DH_KEY_PARAMETERS_NOT_ACCEPTED", "KDC_ERR_CERTIFICATE_MISMATCH", "KRB_AP_ERR_NO_TGT",
           "KDC_ERR_WRONG_REALM", "KRB_AP_ERR_USER_TO_USER_REQUIRED", "KDC_ERR_CANT_VERIFY_CERTIFICATE",
           "KDC_ERR_INVALID_CERTIFICATE", "KDC_ERR_REVOKED_CERTIFICATE", "KDC_ERR_REVOCATION_STATUS_UNKNOWN",
           "KDC_ERR_REVOCATION_STATUS_UNAVAILABLE", "KDC_ERR_CLIENT_NAME_MISMATCH", "KDC_ERR_KDC_NAME_MISMATCH",
           "KDC_ERR_INCONSISTENT_KEY_PURPOSE", "KDC_ERR_DIGEST_IN_CERT_NOT_ACCEPTED",
           "KDC_ERR_PA_CHECKSUM_MUST_BE_INCLUDED", "KDC_ERR_DIGEST_IN_SIGNED_DATA_NOT_ACCEPTED",
           "KDC_ERR_PUBLIC_KEY_ENCRYPTION_NOT_SUPPORTED")


# Every KDC error code (RFC 4120 7.5.9, RFC 4556, RFC 6113), answered on purpose. Codes missing here (there are
# none today) and library errors not listed below are permanent KDC_REFUSED.
KDC_ERRORS: dict[int, KdcError] = {
    1: KdcError("KDC_ERR_NAME_EXP", ACCOUNT_DISABLED),  # the user's account has expired
    2: KdcError("KDC_ERR_SERVICE_EXP", KDC_REFUSED),  # the service's (or the broker's) account has expired
    3: KdcError("KDC_ERR_BAD_PVNO", KDC_REFUSED),
    4: KdcError("KDC_ERR_C_OLD_MAST_KVNO", KDC_REFUSED),
    5: KdcError("KDC_ERR_S_OLD_MAST_KVNO", KDC_REFUSED),
    6: KdcError("KDC_ERR_C_PRINCIPAL_UNKNOWN", UNKNOWN_PRINCIPAL),
    # MIT answers S4U2Self for an unknown user with "server not found"; at S4U2Proxy it is the cluster's SPN
    7: KdcError("KDC_ERR_S_PRINCIPAL_UNKNOWN", SERVICE_UNKNOWN, at_self=UNKNOWN_PRINCIPAL),
    8: KdcError("KDC_ERR_PRINCIPAL_NOT_UNIQUE", KDC_REFUSED),
    9: KdcError("KDC_ERR_NULL_KEY", KDC_REFUSED),
    10: KdcError("KDC_ERR_CANNOT_POSTDATE", KDC_REFUSED),
    11: KdcError("KDC_ERR_NEVER_VALID", KDC_REFUSED),
    # Samba refuses S4U2Self for a disabled user with POLICY, and may refuse S4U2Proxy with it
    12: KdcError("KDC_ERR_POLICY", DELEGATION, at_self=ACCOUNT_DISABLED),
    13: KdcError("KDC_ERR_BADOPTION", DELEGATION, at_self=BROKER_NOT_TRUSTED),
    14: KdcError("KDC_ERR_ETYPE_NOSUPP", KDC_REFUSED),
    15: KdcError("KDC_ERR_SUMTYPE_NOSUPP", KDC_REFUSED),
    16: KdcError("KDC_ERR_PADATA_TYPE_NOSUPP", KDC_REFUSED),
    17: KdcError("KDC_ERR_TRTYPE_NOSUPP", KDC_REFUSED),
    18: KdcError("KDC_ERR_CLIENT_REVOKED", ACCOUNT_DISABLED),  # AD: disabled, locked out or expired
    19: KdcError("KDC_ERR_SERVICE_REVOKED", KDC_REFUSED),
    20: KdcError("KDC_ERR_TGT_REVOKED", BROKER_TICKET),
    21: KdcError("KDC_ERR_CLIENT_NOTYET", ACCOUNT_DISABLED),
    22: KdcError("KDC_ERR_SERVICE_NOTYET", KDC_REFUSED),
    23: KdcError("KDC_ERR_KEY_EXP", ACCOUNT_DISABLED),
    24: KdcError("KDC_ERR_PREAUTH_FAILED", BROKER_KEY),
    25: KdcError("KDC_ERR_PREAUTH_REQUIRED", BROKER_KEY),
    26: KdcError("KDC_ERR_SERVER_NOMATCH", KDC_REFUSED),
    27: KdcError("KDC_ERR_MUST_USE_USER2USER", KDC_REFUSED),
    28: KdcError("KDC_ERR_PATH_NOT_ACCEPTED", KDC_REFUSED),
    29: KdcError("KDC_ERR_SVC_UNAVAILABLE", KDC_UNAVAILABLE),
    31: KdcError("KRB_AP_ERR_BAD_INTEGRITY", BROKER_KEY),
    32: KdcError("KRB_AP_ERR_TKT_EXPIRED", BROKER_TICKET),
    33: KdcError("KRB_AP_ERR_TKT_NYV", CLOCK_SKEW),
    34: KdcError("KRB_AP_ERR_REPEAT", BROKER_TICKET),
    35: KdcError("KRB_AP_ERR_NOT_US", BROKER_KEY),
    36: KdcError("KRB_AP_ERR_BADMATCH", BROKER_TICKET),
    37: KdcError("KRB_AP_ERR_SKEW", CLOCK_SKEW),
    38: KdcError("KRB_AP_ERR_BADADDR", KDC_REFUSED),
    39: KdcError("KRB_AP_ERR_BADVERSION", KDC_REFUSED),
    40: KdcError("KRB_AP_ERR_MSG_TYPE", KDC_REFUSED),
    41: KdcError("KRB_AP_ERR_MODIFIED", BROKER_KEY),
    42: KdcError("KRB_AP_ERR_BADORDER", KDC_REFUSED),
    44: KdcError("KRB_AP_ERR_BADKEYVER", BROKER_KEY),
    45: KdcError("KRB_AP_ERR_NOKEY", BROKER_KEY),
    46: KdcError("KRB_AP_ERR_MUT_FAIL", KDC_REFUSED),
    47: KdcError("KRB_AP_ERR_BADDIRECTION", KDC_REFUSED),
    48: KdcError("KRB_AP_ERR_METHOD", KDC_REFUSED),
    49: KdcError("KRB_AP_ERR_BADSEQ", KDC_REFUSED),
    50: KdcError("KRB_AP_ERR_INAPP_CKSUM", KDC_REFUSED),
    51: KdcError("KRB_AP_PATH_NOT_ACCEPTED", KDC_REFUSED),
    52: KdcError("KRB_ERR_RESPONSE_TOO_BIG", KDC_UNAVAILABLE),  # the library retries over TCP by itself first
    60: KdcError("KRB_ERR_GENERIC", KDC_REFUSED),  # Heimdal's catch-all: a refusal, looked at by a person
    61: KdcError("KRB_ERR_FIELD_TOOLONG", KDC_REFUSED),
    **{62 + n: KdcError(name, KDC_REFUSED) for n, name in enumerate(_PKINIT)},
    90: KdcError("KDC_ERR_PREAUTH_EXPIRED", BROKER_TICKET),
    91: KdcError("KDC_ERR_MORE_PREAUTH_DATA_REQUIRED", BROKER_KEY),
    92: KdcError("KDC_ERR_PREAUTH_BAD_AUTHENTICATION_SET", BROKER_KEY),
    93: KdcError("KDC_ERR_UNKNOWN_CRITICAL_FAST_OPTIONS", KDC_REFUSED),
}


# Errors of the client library rather than the KDC's protocol codes.
LIBRARY_ERRORS: dict[int, KdcError] = {
    **{code: KdcError("KRB5_KDC_UNREACH", KDC_UNAVAILABLE) for code in KDC_UNREACHABLE},
    _KRB5 + 221: KdcError("KRB5_TKT_NOT_FORWARDABLE", DELEGATION, at_self=BROKER_NOT_TRUSTED),
}


def kdc_error(code: int, at_self: bool) -> tuple[str, str]:
    """(the code's name, the reason or outage) for a krb5 error code (signed, as GSSAPI's minor status)."""
    entry = LIBRARY_ERRORS.get(code) or (KDC_ERRORS.get(code - _KRB5) if 0 <= code - _KRB5 < 128 else None)
    if entry is None:
        name = f"KDC error {code - _KRB5}" if 0 <= code - _KRB5 < 128 else f"krb5 error {code}"
        return name, KDC_REFUSED
    return entry.name, (entry.at_self or entry.reason) if at_self else entry.reason


def refusal_message(reason: str, principal: str, broker: str, spn: str | None, code: str, text: str) -> str:
    """One line naming the object an administrator must change for ``reason``."""
    target = spn or "any service"
    if reason == USER_NOT_DELEGABLE:
        return (f"the user {principal} cannot be delegated: the account is marked sensitive (NOT_DELEGATED) "
                f"or is in Protected Users; change the user account, not the broker ({code})")
    if reason == ACCOUNT_DISABLED:
        return f"the account {principal} is disabled, locked or expired ({code})"
    if reason == SERVICE_NOT_ALLOWED:
        return (f"the broker {broker} is not allowed to delegate to {target}: add {target} to the broker account's "
                f"delegation list (msDS-AllowedToDelegateTo / krbAllowedToDelegateTo) ({code})")
    if reason == BROKER_NOT_TRUSTED:
        return (f"the broker account {broker} is not trusted for protocol transition (TRUSTED_TO_AUTH_FOR_DELEGATION"
                f" / ok_to_auth_as_delegate) ({code})")
    if reason == UNKNOWN_PRINCIPAL:
        return f"the directory has no user {principal} ({code})"
    if reason == SERVICE_UNKNOWN:
        return f"the KDC does not know the service principal {target} (its servicePrincipalName) ({code})"
    step = f"S4U2Proxy to {spn}" if spn else f"S4U2Self for {principal}"
    return f"the KDC refused {step}: {code}" + (f" ({text})" if text else "")
