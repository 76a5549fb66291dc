"""Errors a user can cause.

Every error that bad input can trigger (a recipe key, a file, a client, a
server address) is a :class:`ParaBlockError`. Its message names the culprit
and says what to do; the command-line entry points print it in one or two
lines and exit with status 2, without a traceback.
"""

from __future__ import annotations


class ParaBlockError(Exception):
    """Base class of the errors a user can cause and fix."""


class ConfigError(ParaBlockError):
    """A recipe is invalid: unknown key, wrong type or impossible value.

    Args:
        problems: one line per problem, each naming the recipe key.
        source: the recipe file the problems come from, if any.
    """

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            msg = f"invalid recipe{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"invalid recipe{where} ({len(self.problems)} problems):\n{lines}"
        super().__init__(msg)


class DataError(ParaBlockError):
    """A data file is missing, malformed or empty."""


class ModelError(ParaBlockError):
    """A model cannot be built, loaded or partitioned into blocks."""


class FederationError(ParaBlockError):
    """The federation cannot go on: refused join, unreachable server, rejected update."""


class TransportError(FederationError):
    """The connection to the server failed (lost, timed out, corrupted in transit); retrying may help."""


class ResyncNeeded(FederationError):  # noqa: N818 - names the event
    """The client must rejoin the server and adopt its state before it goes on."""


class ServerRestarted(ResyncNeeded):
    """The server answering now is another instance than the one this client joined."""


class VersionSuperseded(ResyncNeeded):
    """The server no longer holds the version of a block that a pull asked for: a later round replaced it."""


class TransmitterError(FederationError):
    """The transmitter thread failed; raised on the training thread with the cause attached."""
