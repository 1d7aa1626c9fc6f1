"""The project's error hierarchy: what went wrong, said once at the boundary where it happened."""


class SessionGcError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SessionGcError):
    """A setting is missing or malformed; the message names the environment variable."""


class InvalidSessionId(SessionGcError, ValueError):
    """A session id that must not reach a key pattern or a query."""


class BadEvent(SessionGcError, ValueError):
    """An event or message body that does not have the documented shape."""


class StoreUnavailable(SessionGcError):
    """A store could not be reached or failed mid-operation; worth retrying later."""


class SchemaMissing(SessionGcError):
    """The PostgreSQL tables or columns the GC relies on are not there."""


class TempStoreError(SessionGcError):
    """Some temp files could not be removed; the message says which and why."""
