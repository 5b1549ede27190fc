"""`keel codec-server`: decrypt Keel's encrypted history for the Temporal UI and CLI; `--new-key` makes a key."""

from __future__ import annotations

import ipaddress
import sys
from typing import Annotated

import typer
from rich.markup import escape

from keel.codec import ENV_KEYS, EncryptionConfigError, codec_from_settings, new_key
from starter.codec_server import CodecServer, default_origins
from starter.console import console, err, load_settings


def codec_server(
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on")] = 8081,
    host: Annotated[str, typer.Option("--host", help="Address to bind; keep it local unless behind TLS")] = "127.0.0.1",
    ui_origin: Annotated[list[str] | None, typer.Option(
        "--ui-origin", help="Origin of the Temporal UI allowed by CORS (repeatable; default: the local UI)")] = None,
    new: Annotated[bool, typer.Option("--new-key", help=f"Print a fresh key entry for {ENV_KEYS} and exit")] = False,
    key_id: Annotated[str, typer.Option("--key-id", help="Id of the key --new-key prints")] = "k1",
) -> None:
    """Serve /encode and /decode for the Temporal UI's codec endpoint, with the keys of KEEL_ENCRYPTION_KEYS."""
    if new:
        print(f"{ENV_KEYS}={key_id}:{new_key()}")
        err.print(f"To rotate: put the new entry in {ENV_KEYS} next to the old ones (old keys still decrypt old "
                  f"histories) and set KEEL_ENCRYPTION_KEY_ID={key_id} (default: the first listed).")
        return
    settings = load_settings()
    try:
        codec = codec_from_settings(settings, required=True)
    except EncryptionConfigError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    assert codec is not None
    origins = ui_origin or default_origins(settings.ui_url)
    token = settings.codec_auth_token
    try:
        server = CodecServer(codec, host=host, port=port, allowed_origins=origins, auth_token=token)
    except OSError as e:
        err.print(f"[red]cannot listen on {host}:{port}: {e.strerror or e}[/red] (choose another with --port)")
        raise typer.Exit(1) from e
    if not _loopback(host) and not token:
        err.print("[yellow]warning:[/yellow] listening beyond this machine without KEEL_CODEC_AUTH_TOKEN: "
                  "anyone who reaches it can decrypt your histories.")
    keys = ", ".join(f"{k}{' (active)' if k == codec.key_id else ''}" for k in codec.key_ids)
    console.print(f"codec server on [bold]{server.url}[/bold]  keys: {escape(keys)}")
    console.print(f"  CORS for: {escape(', '.join(origins))}")
    console.print(f"  Temporal UI ({escape(settings.ui_url)}): Settings (the 'Codec Server' button) -> "
                  f"Codec Server endpoint: [bold]{server.url}[/bold]"
                  + (" and turn on 'Pass the user access token'" if token else ""), soft_wrap=True)
    auth = ' --codec-auth "Bearer $KEEL_CODEC_AUTH_TOKEN"' if token else ""
    console.print(f"  temporal CLI: temporal workflow show -w <id> --codec-endpoint {server.url}{auth}",
                  soft_wrap=True)
    if token:
        console.print("  requests need the header: Authorization: Bearer <KEEL_CODEC_AUTH_TOKEN>")
    console.print("Press Ctrl-C to stop.")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
