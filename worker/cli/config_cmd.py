"""``fnq config``: the effective settings, secrets masked."""

from __future__ import annotations

import click

from config.settings import Settings, env_name, public_view, unknown_env_names
from worker.cli._common import friendly_errors, json_option, print_json, print_table, settings_from


def markdown_table() -> str:
    """The configuration table of docs/configuration.md, made from the fields themselves."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        if info.default_factory is not None:
            default = "(see meaning)"
        else:
            value = info.default
            default = "" if value is None else str(value)
            default = default.lower() if isinstance(value, bool) else default
        meaning = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{env_name(name)}` | `{default}` | {meaning} |")
    return "\n".join(lines) + "\n"


@click.command("config")
@json_option
@click.option("--markdown", is_flag=True, help="Print the documentation table of every setting.")
@click.pass_context
@friendly_errors
def config_cmd(ctx: click.Context, as_json: bool, markdown: bool) -> None:
    """Show the effective settings (environment, .env and defaults)."""
    if markdown:
        click.echo(markdown_table(), nl=False)
        return
    view = public_view(settings_from(ctx))
    for name in unknown_env_names():
        click.echo(f"fnq: {name} is not a setting of fnq: ignored", err=True)
    if as_json:
        print_json(view)
    else:
        print_table(["VARIABLE", "VALUE"], sorted(view.items()))
