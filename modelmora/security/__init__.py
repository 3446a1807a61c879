"""Security at the edge: bearer tokens with scopes (`Gate`), per-token limits, the audit trail and
TLS contexts that follow their files. The core sees only an `Identity`."""

from .audit import audit, audited
from .exposure import LOOPBACK_HOSTS, check_exposure
from .gate import REALM, Gate, Permit, bearer_token
from .identity import ANONYMOUS, OPEN, TOKEN, Access, Identity, Scope
from .limits import TokenLimits
from .reload import POLL_S, Reloadable, follow_files
from .tls import GRPC_ALPN, HTTP_ALPN, TLS_CIPHERS, ServerTls, TlsError, server_context
from .tokens import MIN_TOKEN_CHARS, TokenError, TokenTable, parse_tokens

__all__ = (
    "ANONYMOUS",
    "GRPC_ALPN",
    "HTTP_ALPN",
    "LOOPBACK_HOSTS",
    "MIN_TOKEN_CHARS",
    "OPEN",
    "POLL_S",
    "REALM",
    "TLS_CIPHERS",
    "TOKEN",
    "Access",
    "Gate",
    "Identity",
    "Permit",
    "Reloadable",
    "Scope",
    "ServerTls",
    "TlsError",
    "TokenError",
    "TokenLimits",
    "TokenTable",
    "audit",
    "audited",
    "bearer_token",
    "check_exposure",
    "follow_files",
    "parse_tokens",
    "server_context",
)
