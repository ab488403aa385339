"""Who is in the sandbox's Active Directory: the one table of users, groups, clusters and service accounts.

``SambaAD.populate()`` creates exactly this; tests and the broker's sandbox read names from ``PLAN`` (e.g.
``PLAN.user("carol").upn``, ``PLAN.delegated``) instead of hard-coding them.

    user       what it is there for                                 groups                 flags
    alice      member of Analysts only through DataSci (nesting)    DataSci (in Analysts, in AllStaff)
    bob        member of Analysts directly                          Analysts
    sensitive  "sensitive and cannot be delegated"                   Analysts               NOT_DELEGATED
    disabled   a disabled account                                   Analysts               ACCOUNTDISABLE
    carol      UPN carol.smith@corp.example.com, IdP e-mail          Analysts
               carol.smith@example.com: the suffixes differ

    Every user's e-mail at the IdP (``PLAN.email(name)``, default name@example.com) is also AD's ``mail``.

    kjbroker   the broker: TRUSTED_TO_AUTH_FOR_DELEGATION, msDS-AllowedToDelegateTo = analytics's and finance's
               SPNs (not orders'), SPN HTTP/kjbroker.<dns domain>, keytab
    kjldap     the broker's LDAP bind account (a plain user; simple bind over LDAPS)
    pg-<c>     PostgreSQL service account of cluster c, SPN postgres/<c's address>, keytab by exportkeytab
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PLAN", "DirectoryPlan", "UserPlan"]


@dataclass(frozen=True)
class UserPlan:
    """A person's account: ``name`` is the sAMAccountName; ``upn`` defaults to ``name@realm``."""

    name: str
    case: str  # what this user is there to test
    groups: tuple[str, ...] = ()
    upn: str | None = None
    email: str | None = None  # the IdP's name for the user (AWS session name), also AD's ``mail``
    disabled: bool = False
    sensitive: bool = False  # "account is sensitive and cannot be delegated" (UF_NOT_DELEGATED)


@dataclass(frozen=True)
class DirectoryPlan:
    """Everything ``SambaAD.populate()`` creates. Group membership nests: ``groups[g]`` lists g's members."""

    users: tuple[UserPlan, ...]
    groups: dict[str, tuple[str, ...]]
    clusters: tuple[str, ...]
    delegated: tuple[str, ...]  # clusters in the broker's msDS-AllowedToDelegateTo
    broker: str
    ldap_reader: str
    idp_domain: str = "example.com"  # the IdP's e-mail domain (AWS session names are name@idp_domain)
    service_prefix: str = "pg-"  # PostgreSQL service account of cluster c: f"{service_prefix}{c}"
    user_index: dict[str, UserPlan] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "user_index", {u.name: u for u in self.users})

    def user(self, name: str) -> UserPlan:
        return self.user_index[name]

    def email(self, name: str) -> str:
        """The user's e-mail at the IdP (default ``name@idp_domain``): what an AWS role session is named after."""
        return self.user(name).email or f"{name}@{self.idp_domain}"

    def service_account(self, cluster: str) -> str:
        return f"{self.service_prefix}{cluster}"


PLAN = DirectoryPlan(
    users=(
        UserPlan("alice", "member of Analysts only through DataSci (nested groups)", groups=("DataSci",)),
        UserPlan("bob", "member of Analysts directly", groups=("Analysts",)),
        UserPlan("sensitive", "account is sensitive and cannot be delegated (NOT_DELEGATED)", groups=("Analysts",),
                 sensitive=True),
        UserPlan("disabled", "disabled account (ACCOUNTDISABLE)", groups=("Analysts",), disabled=True),
        UserPlan("carol", "UPN suffix differs from the IdP's e-mail domain", groups=("Analysts",),
                 upn="carol.smith@corp.example.com", email="carol.smith@example.com"),
    ),
    # alice -> DataSci -> Analysts -> AllStaff: two levels of nesting. Users join through UserPlan.groups.
    groups={"AllStaff": ("Analysts",), "Analysts": ("DataSci",), "DataSci": ()},
    clusters=("analytics", "finance", "orders"),
    delegated=("analytics", "finance"),
    broker="kjbroker",  # TRUSTED_TO_AUTH_FOR_DELEGATION, msDS-AllowedToDelegateTo = delegated clusters' SPNs
    ldap_reader="kjldap",  # a plain domain user the broker binds as (simple bind over LDAPS)
)
