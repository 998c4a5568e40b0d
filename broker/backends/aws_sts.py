"""AWS STS: AssumeRole with a session policy, SourceIdentity and session tags.

Every request the broker makes to AWS goes through this module (the only one importing boto3).
The broker's own AWS identity comes from the standard credential chain (environment, shared
files, container or instance role, web identity).

STS credentials cannot be revoked one by one. What the broker offers instead (see
``docs/backends.md``) are kill switches, written as one inline policy on the role and rendered
by :mod:`broker.backends.sts_deny` from the store: ended sessions denied by issue-time segments
(with exceptions for live ones) or by their ``aws:SourceIdentity`` (one per credential, it
survives role chaining), and per role ``Deny *`` for sessions issued before a moment.

This module only reads, sizes and writes the policy document (``read_kill_switch``,
``kill_switch_budget``, ``write_kill_switch``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import boto3
import botocore.exceptions
from botocore.config import Config

from broker.backends import sts_deny, sts_rules
from broker.backends.aws_trust import principal_arn, trust_verdict
from broker.backends.base import Minted, MintOutcomeUnknown, MintRequest, Revocation, RevokeRef
from broker.domain.scope import AwsStsBackend as AwsStsSpec
from broker.domain.scope import ScopeTemplate
from broker.errors import InvalidRequest, ScopeMisconfigured, ServiceUnavailable
from broker.scopes.prerequisites import Requirement, requirements, trust_statement
from broker.settings import AwsSettings

if TYPE_CHECKING:
    from mypy_boto3_iam.client import IAMClient
    from mypy_boto3_sts.client import STSClient

log = logging.getLogger(__name__)

#: How long what the broker learnt about a role (exists, MaxSessionDuration) is reused.
ROLE_CACHE_SECONDS = 300.0
#: How long a successful health check (GetCallerIdentity) is reused.
HEALTH_CACHE_SECONDS = 30.0
#: Refusals from STS that prove nothing was issued and that retrying cannot fix.
_REFUSALS = {
    "PackedPolicyTooLarge",
    "MalformedPolicyDocument",
    "ValidationError",
    "AccessDenied",
    "RegionDisabledException",
    "ExpiredTokenException",
    "InvalidParameterValue",
}
_NOT_SENT = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
)
_MAYBE_SENT = (
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)


def role_name(role_arn: str) -> str:
    """The role's name (the last path segment of its ARN)."""
    return role_arn.split(":role/", 1)[1].rsplit("/", 1)[-1]


def _error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class AwsStsBackend:
    """Mints AWS credentials with AssumeRole."""

    name = "aws_sts"
    revocation: Revocation = "deny_list"

    def __init__(
        self,
        settings: AwsSettings,
        *,
        cluster: str = "broker",
        clock: Callable[[], float] = time.time,
        session: boto3.session.Session | None = None,
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.clock = clock
        self._session = session
        self._lock = threading.Lock()
        self._sts: STSClient | None = None
        self._iam: IAMClient | None = None
        self._roles: dict[str, tuple[float, int | None]] = {}
        self._budgets: dict[str, tuple[float, int]] = {}
        self._caller: tuple[float, str] | None = None
        self.role_checks = "on" if settings.verify_roles else "off"

    # --- clients (thread-safe once built; the boto3 session is not, so build under a lock) --

    def _config(self) -> Config:
        return Config(
            region_name=self.settings.region,
            connect_timeout=self.settings.timeout,
            read_timeout=self.settings.timeout,
            # Standard mode retries throttling and transient errors by resending the very same
            # request; the broker never makes a second, different AssumeRole call.
            retries={"mode": "standard", "max_attempts": 3},
        )

    @property
    def sts(self) -> STSClient:
        if self._sts is None:
            with self._lock:
                if self._sts is None:
                    session = self._session or boto3.session.Session()
                    self._sts = session.client(
                        "sts", endpoint_url=self.settings.endpoint_url, config=self._config()
                    )
        return self._sts

    @property
    def iam(self) -> IAMClient:
        if self._iam is None:
            with self._lock:
                if self._iam is None:
                    session = self._session or boto3.session.Session()
                    self._iam = session.client(
                        "iam", endpoint_url=self.settings.endpoint_url, config=self._config()
                    )
        return self._iam

    # --- interface ------------------------------------------------------------------------

    def plan(self, request: MintRequest) -> dict[str, Any]:
        """Every STS rule checked without I/O; the identifiers recorded with the intent."""
        spec = request.spec
        if not isinstance(spec, AwsStsSpec):
            raise InvalidRequest(f"the aws_sts backend cannot mint {type(spec).__name__}")
        params = self._parameters(request, spec, role_max=None, chained=False)
        return {
            "role_arn": spec.role_arn,
            "source_identity": params["SourceIdentity"],
            "role_session_name": params["RoleSessionName"],
            "duration": params["DurationSeconds"],
            # The latest a credential minted from this intent can live (kill switches last as long).
            "max_expires_at": self.clock() + params["DurationSeconds"] + 60,
        }

    def _parameters(
        self, request: MintRequest, spec: AwsStsSpec, *, role_max: int | None, chained: bool
    ) -> dict[str, Any]:
        tags = {
            "broker:cluster": request.cluster,
            "broker:task": request.task_id,
            "broker:credential": request.credential_id,
            "broker:scope": request.scope,
            "broker:subject": sts_rules.sanitize_tag_value(request.subject),
        }
        for key, value in spec.tags.items():
            if key.lower().startswith("broker:"):
                raise InvalidRequest(
                    "a scope's session tags cannot use the broker: prefix", code="sts_invalid_tag"
                )
            tags[key] = value
        params: dict[str, Any] = {
            "RoleArn": spec.role_arn,
            "RoleSessionName": sts_rules.role_session_name(request.credential_id, request.subject),
            "SourceIdentity": sts_rules.source_identity(request.credential_id, request.subject),
            "DurationSeconds": sts_rules.duration(
                request.ttl, template_cap=spec.role_max_session, role_max=role_max, chained=chained
            ),
            "Tags": sts_rules.session_tags(tags),
        }
        policy = sts_rules.session_policy(spec.session_policy)
        if policy is not None:
            params["Policy"] = policy
        arns = list(getattr(spec, "policy_arns", None) or [])
        if arns:
            params["PolicyArns"] = sts_rules.policy_arns(arns)
        transitive = list(getattr(spec, "transitive_tag_keys", None) or [])
        if transitive:
            params["TransitiveTagKeys"] = sts_rules.transitive_tag_keys(transitive, tags)
        external_id = sts_rules.check_external_id(spec.external_id)
        if external_id is not None:
            params["ExternalId"] = external_id
        return params

    def mint(self, request: MintRequest) -> Minted:
        spec = request.spec
        if not isinstance(spec, AwsStsSpec):
            raise InvalidRequest(f"the aws_sts backend cannot mint {type(spec).__name__}")
        try:
            role_max = self._role_max(spec.role_arn)
            chained = ":assumed-role/" in self._caller_arn()
            params = self._parameters(request, spec, role_max=role_max, chained=chained)
            response = self.sts.assume_role(**params)
        except botocore.exceptions.ClientError as exc:
            code = _error_code(exc)
            if code in ("AccessDenied", "NoSuchEntity"):
                # The role does not trust the broker (or the broker may not assume it): only an
                # admin can fix that, so the agent is told the scope is misconfigured.
                raise ScopeMisconfigured(
                    "the scope is misconfigured at AWS",
                    internal=f"AssumeRole of {spec.role_arn} by {self._caller_arn_or_unknown()}: "
                    f"{code}: {exc}"[:500],
                ) from None
            raise ServiceUnavailable(
                "AWS STS refused to issue the credential"
                if code in _REFUSALS
                else "AWS STS could not issue the credential",
                code="backend_refused" if code in _REFUSALS else "backend_unavailable",
                internal=f"{code}: {exc}"[:500],
            ) from None
        except _NOT_SENT as exc:
            self._caller = None  # readiness checks again instead of trusting its cache
            raise ServiceUnavailable(
                "AWS STS is unavailable", code="backend_unavailable", internal=repr(exc)[:500]
            ) from None
        except _MAYBE_SENT as exc:
            self._caller = None
            raise MintOutcomeUnknown(
                "AWS STS did not answer in time; nothing was issued", internal=repr(exc)[:500]
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            self._caller = None
            raise ServiceUnavailable(
                "AWS STS is unavailable", code="backend_unavailable", internal=repr(exc)[:500]
            ) from None
        creds = response["Credentials"]
        expires_at = creds["Expiration"].timestamp()
        packed = response.get("PackedPolicySize")
        if sts_rules.check_packed_policy_size(packed):
            log.warning(
                "session policy and tags for %s use %s%% of STS's packed size",
                request.scope,
                packed,
            )
        env = {
            "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
            "AWS_SESSION_TOKEN": creds["SessionToken"],
            "AWS_REGION": self.settings.region,
            "AWS_DEFAULT_REGION": self.settings.region,
            "AWS_CREDENTIAL_EXPIRATION": sts_rules.iso_utc(expires_at),
        }
        if self.settings.endpoint_url:
            env["AWS_ENDPOINT_URL"] = self.settings.endpoint_url
        return Minted(
            kind="aws_sts",
            handle=creds["AccessKeyId"],
            expires_at=expires_at,
            secret={
                "access_key_id": creds["AccessKeyId"],
                "secret_access_key": creds["SecretAccessKey"],
                "session_token": creds["SessionToken"],
            },
            env=env,
            details={
                "role_arn": spec.role_arn,
                "assumed_role_arn": response["AssumedRoleUser"]["Arn"],
                "source_identity": params["SourceIdentity"],
                "role_session_name": params["RoleSessionName"],
                "duration": params["DurationSeconds"],
                "packed_policy_size": packed,
                "session_policy_chars": len(params.get("Policy", "")),
                "max_expires_at": expires_at,
            },
        )

    def revoke(self, ref: RevokeRef) -> None:
        """STS cannot revoke a session; the broker's kill switches deny it instead."""
        raise ServiceUnavailable(
            "AWS STS credentials cannot be revoked one by one; the broker uses a kill switch",
            code="not_revocable",
        )

    def health(self) -> None:
        now = time.monotonic()
        if self._caller is not None and now - self._caller[0] < HEALTH_CACHE_SECONDS:
            return
        self._caller = None
        self._caller_arn()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "region": self.settings.region,
            "endpoint_url": self.settings.endpoint_url,
            "kinds": ["aws_sts"],
            "revocation": "kill switch (ended sessions denied by issue-time segments with "
            "exceptions for live ones, or by SourceIdentity; per role by TokenIssueTime)",
            "role_checks": self.role_checks,
            "kill_switch_policy": self.settings.kill_switch_policy,
        }

    # --- facts about the broker's identity and the roles --------------------------------------

    def _caller_arn(self) -> str:
        cached = self._caller
        if cached is not None and time.monotonic() - cached[0] < ROLE_CACHE_SECONDS:
            return cached[1]
        try:
            arn = self.sts.get_caller_identity()["Arn"]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise ServiceUnavailable(
                "AWS STS is unavailable", code="backend_unavailable", internal=repr(exc)[:500]
            ) from None
        self._caller = (time.monotonic(), arn)
        return arn

    def _caller_arn_or_unknown(self) -> str:
        cached = self._caller
        return cached[1] if cached is not None else "the broker"

    def _role_max(self, role_arn: str) -> int | None:
        """The role's MaxSessionDuration; refuses a role that does not exist."""
        if not self.settings.verify_roles:
            return None
        cached = self._roles.get(role_arn)
        if cached is not None and time.monotonic() - cached[0] < ROLE_CACHE_SECONDS:
            return cached[1]
        try:
            role = self.iam.get_role(RoleName=role_name(role_arn))["Role"]
        except botocore.exceptions.ClientError as exc:
            code = _error_code(exc)
            if code == "NoSuchEntity":
                raise ScopeMisconfigured(
                    "the scope is misconfigured at AWS",
                    internal=f"IAM role {role_arn} does not exist",
                ) from None
            if code in ("AccessDenied", "AccessDeniedException"):
                # The broker may not read roles: fall back to the template's declared maximum.
                if self.role_checks != "denied":
                    log.warning("iam:GetRole is denied; relying on templates' role_max_session")
                self.role_checks = "denied"
                self._roles[role_arn] = (time.monotonic(), None)
                return None
            raise
        if role["Arn"] != role_arn:
            raise ScopeMisconfigured(
                "the scope is misconfigured at AWS",
                internal=f"IAM role {role_arn} does not exist (its name resolves to {role['Arn']})",
            )
        max_session = int(role.get("MaxSessionDuration") or 3600)
        self._roles[role_arn] = (time.monotonic(), max_session)
        return max_session

    # --- prerequisites (``broker scopes check --live``) ---------------------------------------

    def check(self, template: ScopeTemplate) -> list[Requirement]:
        """The role exists, is long enough, and trusts the broker (asked now, nothing cached)."""
        spec = template.backend
        if not isinstance(spec, AwsStsSpec):
            return []
        listed = {r.key: r for r in requirements(template)}
        exists, trust = listed[("iam_role", spec.role_arn)], listed[("trust", spec.role_arn)]
        try:
            caller = self.sts.get_caller_identity()["Arn"]
            role = self.iam.get_role(RoleName=role_name(spec.role_arn))["Role"]
        except botocore.exceptions.ClientError as exc:
            code = _error_code(exc)
            if code == "NoSuchEntity":
                return [
                    exists.checked("missing", f"IAM has no role {role_name(spec.role_arn)!r}"),
                    trust.checked("missing", "the role does not exist"),
                ]
            why = f"IAM refused to describe the role ({code}): the broker needs iam:GetRole"
            return [exists.checked("unknown", why), trust.checked("unknown", why)]
        except botocore.exceptions.BotoCoreError as exc:
            why = f"AWS did not answer ({type(exc).__name__})"
            return [exists.checked("unknown", why), trust.checked("unknown", why)]
        out: list[Requirement] = []
        max_session = int(role.get("MaxSessionDuration") or 3600)
        if role["Arn"] != spec.role_arn:
            out.append(exists.checked("missing", f"the name resolves to {role['Arn']}"))
        elif max_session < spec.role_max_session:
            out.append(
                exists.checked(
                    "missing",
                    f"its maximum session is {max_session} s",
                    fix=f"aws iam update-role --role-name {role_name(spec.role_arn)} "
                    f"--max-session-duration {spec.role_max_session} (or lower role_max_session)",
                )
            )
        else:
            out.append(exists.checked("ok", f"exists, maximum session {max_session} s"))
        verdict = trust_verdict(role.get("AssumeRolePolicyDocument"), caller)
        fix = "add to its trust policy: " + trust_statement(principal_arn(caller))
        if verdict.missing:
            out.append(
                trust.checked(
                    "missing",
                    f"it does not allow {', '.join(verdict.missing)} to {principal_arn(caller)}",
                    fix=fix,
                )
            )
        else:
            found = f"allows {principal_arn(caller)}"
            if verdict.conditional:
                found += " (under conditions the check does not evaluate)"
            out.append(trust.checked("ok", found, fix=fix))
        return out

    # --- kill switches ------------------------------------------------------------------------

    def read_kill_switch(self, role_arn: str) -> dict[str, Any] | None:
        """The role's kill-switch policy as IAM holds it, or None."""
        try:
            response = self.iam.get_role_policy(
                RoleName=role_name(role_arn), PolicyName=self.settings.kill_switch_policy
            )
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) == "NoSuchEntity":
                return None
            raise ServiceUnavailable(
                "IAM refused to read the kill switch", code="backend_refused", internal=str(exc)
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise ServiceUnavailable(
                "IAM is unavailable", code="backend_unavailable", internal=repr(exc)
            ) from None
        document: Any = response["PolicyDocument"]
        if isinstance(document, str):  # some SDKs and moto versions return it URL-encoded
            document = json.loads(unquote(document))
        return dict(document)

    def kill_switch_budget(self, role_arn: str) -> int:
        """Characters left for the kill switch among the role's inline policies (IAM counts
        them together, whitespace excluded); the others are re-read every few minutes."""
        cached = self._budgets.get(role_arn)
        if cached is not None and time.monotonic() - cached[0] < ROLE_CACHE_SECONDS:
            return cached[1]
        name = role_name(role_arn)
        others = 0
        try:
            paginator = self.iam.get_paginator("list_role_policies")
            for page in paginator.paginate(RoleName=name):
                for policy in page["PolicyNames"]:
                    if policy == self.settings.kill_switch_policy:
                        continue
                    text: Any = self.iam.get_role_policy(RoleName=name, PolicyName=policy)[
                        "PolicyDocument"
                    ]
                    if not isinstance(text, str):
                        text = json.dumps(text, separators=(",", ":"))
                    others += sts_deny.policy_chars(unquote(text))
        except botocore.exceptions.ClientError as exc:
            raise ServiceUnavailable(
                "IAM refused to list the role's policies",
                code="backend_refused",
                internal=f"{_error_code(exc)}: {exc}"[:500],
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise ServiceUnavailable(
                "IAM is unavailable", code="backend_unavailable", internal=repr(exc)[:500]
            ) from None
        budget = sts_deny.inline_budget(others)
        self._budgets[role_arn] = (time.monotonic(), budget)
        return budget

    def write_kill_switch(
        self, role_arn: str, document: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """Make the role's kill-switch policy exactly ``document`` (None: delete it)."""
        try:
            if document is None:
                try:
                    self.iam.delete_role_policy(
                        RoleName=role_name(role_arn), PolicyName=self.settings.kill_switch_policy
                    )
                except botocore.exceptions.ClientError as exc:
                    if _error_code(exc) != "NoSuchEntity":
                        raise
                return None
            self.iam.put_role_policy(
                RoleName=role_name(role_arn),
                PolicyName=self.settings.kill_switch_policy,
                PolicyDocument=sts_deny.compact(document),
            )
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) == "LimitExceeded":
                self._budgets.pop(role_arn, None)  # another inline policy grew: measure again
            raise ServiceUnavailable(
                "IAM refused to write the kill switch",
                code="kill_switch_full"
                if _error_code(exc) == "LimitExceeded"
                else "backend_refused",
                internal=f"{_error_code(exc)}: {exc}"[:500],
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise ServiceUnavailable(
                "IAM is unavailable", code="backend_unavailable", internal=repr(exc)[:500]
            ) from None
        return document


# --- dev and test provisioning (moto) ---------------------------------------------------------

#: The example scopes' roles: (name, MaxSessionDuration).
EXAMPLE_ROLES = (("broker-s3-read", 3600), ("broker-deploy", 7200))
EXAMPLE_ACCOUNT = "123456789012"


def trust_policy(account: str = EXAMPLE_ACCOUNT) -> str:
    """A trust policy letting the account's principals assume the role, tag the session and set
    a source identity (what the broker's AssumeRole needs)."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                    "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
                }
            ],
        }
    )


def provision_dev_roles(
    endpoint_url: str,
    roles: Iterable[tuple[str, int]] = EXAMPLE_ROLES,
    *,
    region: str = "us-east-1",
) -> list[str]:
    """Create the example roles in a moto server (idempotent); returns their ARNs."""
    session = boto3.session.Session(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106  # moto's dummy keys
        region_name=region,
    )
    iam = session.client("iam", endpoint_url=endpoint_url)
    arns = []
    for name, max_session in roles:
        try:
            role = iam.create_role(
                RoleName=name,
                AssumeRolePolicyDocument=trust_policy(),
                MaxSessionDuration=max_session,
                Description="broker example role (dev)",
            )["Role"]
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) != "EntityAlreadyExists":
                raise
            role = iam.get_role(RoleName=name)["Role"]
        iam.put_role_policy(
            RoleName=name,
            PolicyName="example-permissions",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Action": ["s3:GetObject", "s3:ListBucket"],
                            "Resource": "*",
                        }
                    ],
                }
            ),
        )
        arns.append(role["Arn"])
    return arns
