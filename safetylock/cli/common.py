"""What every ``safetylock`` command shares: the group, one-line errors, and the option sets defined once."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from safetylock import models
from safetylock.alpha import check_alpha
from safetylock.errors import SafetylockError


def user_errors(func):
    """Turn the library's input errors into one-line CLI errors (exit code 1, no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SafetylockError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


class AlphaType(click.ParamType):
    """A finite steering strength within the lock format's bounds."""

    name = "alpha"

    def convert(self, value, param, ctx):
        try:
            return check_alpha(float(value))
        except (TypeError, ValueError) as exc:
            self.fail(str(exc), param, ctx)


ALPHA = AlphaType()


def model_option(help: str = "Packaged model name or local HF model directory.", **kwargs):
    return click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True, help=help, **kwargs)


def lock_option(required: bool = True, **kwargs):
    return click.option("--lock", "lock_path", type=click.Path(path_type=Path), required=required, **kwargs)


def alpha_option(help: str = "Default: the lock's own α."):
    return click.option("--alpha", type=ALPHA, default=None, help=help)


def response_options(func):
    """``--response`` and ``--refusal-message``: how a gated server answers requests whose gate fires."""
    from safetylock.respond import RESPONSES

    func = click.option(
        "--refusal-message",
        default=None,
        help="Gated, --response refuse: the answer to requests whose gate fires (default: a one-line refusal).",
    )(func)
    return click.option(
        "--response",
        type=click.Choice(RESPONSES),
        default=None,
        help="Gated: answer requests whose gate fires with the refusal message (refuse, the default) or by "
        "steering the model at --alpha (steer).",
    )(func)


def _response_section(gated: bool, response: str | None, refusal_message: str | None) -> dict[str, str]:
    """The section keys of ``--response``/``--refusal-message`` (checked together by ``serve_config``)."""
    if (response or refusal_message) and not gated:
        message = "--response and --refusal-message apply to gated serving: add --gated"
        raise click.BadParameter(message, param_hint="--response")
    return {k: v for k, v in {"response": response, "refusal_message": refusal_message}.items() if v is not None}


@click.group()
@click.version_option(package_name="safetylock")
def main() -> None:
    """Extract, inspect and apply SafetyLocks."""
