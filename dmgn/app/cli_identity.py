"""`dmgn init`, `export`, `import`, `passwd`: the identity, its vault and its backups (a file
or SLIP-39 shares; docs/recovery.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from dmgn.api_token import create_token
from dmgn.app import daemon
from dmgn.app.cli_common import F, Options, common, emit
from dmgn.app.unlock import read_passphrase, unlock
from dmgn.config import load_config, save_config
from dmgn.errors import AlreadyInitialized, InvalidInput
from dmgn.identity import (
    EXPORT_FORMAT,
    check_passphrase,
    decrypt_seed,
    encrypt_seed,
    identity_id,
    load_or_create_device_id,
    new_seed,
    write_vault,
)
from dmgn.paths import write_private


@click.command()
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing identity (its memories become unreadable unless you exported it).",
)
@common
def init(options: Options, force: bool) -> None:
    """Create a new identity (ed25519) protected by a passphrase."""
    dd = options.data_dir
    if dd.vault.exists() and not force:
        raise AlreadyInitialized(
            f"an identity already exists in {dd.root}; use --force to replace it (export it "
            "first with `dmgn export`) or choose another --data-dir"
        )
    passphrase = read_passphrase(
        options.passphrase_file, prompt="New passphrase (min 8 chars): ", confirm=True
    )
    seed = new_seed()
    data = encrypt_seed(seed, passphrase)
    dd.ensure()
    config = load_config(dd.config)
    with daemon.offline_access(dd, before="replacing the identity"):
        write_vault(dd.vault, data)
        device = load_or_create_device_id(dd.device)
    if not dd.config.exists():
        save_config(dd.config, config, dd.root)
    create_token(dd.api_token)
    emit(
        options,
        "init",
        {
            "identity_id": identity_id(seed),
            "device_id": device.hex(),
            "data_dir": str(dd.root),
            "vault": str(dd.vault),
            "api_token_file": str(dd.api_token),
        },
    )


SHARE_PASSPHRASE_ENV = "DMGN_SHARE_PASSPHRASE"


def share_passphrase_options(func: F) -> F:
    """--share-passphrase / --share-passphrase-file: the optional SLIP-39 passphrase."""
    func = click.option(
        "--share-passphrase-file",
        type=click.Path(path_type=Path),
        default=None,
        help=f"Read the share passphrase from FILE (env {SHARE_PASSPHRASE_ENV} also works).",
    )(func)
    return click.option(
        "--share-passphrase",
        "use_share_passphrase",
        is_flag=True,
        help="Shares locked with an extra SLIP-39 passphrase (asked for). A wrong one gives "
        "another identity without error, so note the identity id.",
    )(func)


def read_share_passphrase(use: bool, passphrase_file: Path | None, *, confirm: bool) -> str:
    if not use and passphrase_file is None:
        return ""
    passphrase = read_passphrase(
        passphrase_file, prompt="Share passphrase: ", confirm=confirm, env=SHARE_PASSPHRASE_ENV
    )
    from dmgn.recovery import check_share_passphrase

    check_share_passphrase(passphrase)
    return passphrase


@click.command("export")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="File to write the encrypted identity backup to; with --shares, a directory to "
    "write one 0600 file per share to.",
)
@click.option(
    "--shares",
    "share_spec",
    metavar="SPEC",
    default=None,
    help='Split the identity into SLIP-39 shares for people you trust: "3-of-5", or groups '
    '"2-of-3 family, 1 of lawyer" (all needed) or "2 groups: 2-of-3 family, 1 of lawyer, '
    '1 of safe". Printed once, or written to -o DIR. See docs/recovery.md.',
)
@share_passphrase_options
@click.option(
    "--force",
    is_flag=True,
    help="With --shares and no -o: print the shares even though stdout is not a terminal.",
)
@common
def export_identity(
    options: Options,
    output: Path | None,
    share_spec: str | None,
    use_share_passphrase: bool,
    share_passphrase_file: Path | None,
    force: bool,
) -> None:
    """Export the identity: an encrypted backup file (same passphrase), or SLIP-39 shares."""
    if share_spec is not None:
        export_shares(
            options, share_spec, output, use_share_passphrase, share_passphrase_file, force
        )
        return
    if output is None:
        raise InvalidInput("say where to write the backup: -o FILE (or split it with --shares)")
    passphrase = read_passphrase(options.passphrase_file)
    seed, _ = unlock(options.data_dir, passphrase)
    if output.exists():
        raise InvalidInput(f"{output} exists; choose another file name")
    write_private(output, encrypt_seed(seed, passphrase, fmt=EXPORT_FORMAT))
    emit(options, "export", {"identity_id": identity_id(seed), "file": str(output)})


def export_shares(
    options: Options,
    spec: str,
    directory: Path | None,
    use_share_passphrase: bool,
    share_passphrase_file: Path | None,
    force: bool,
) -> None:
    # Imported here, as in the import command: only --shares needs SLIP-39.
    from dmgn.app.share_io import print_shares, write_share_files
    from dmgn.recovery import parse_scheme, split_seed

    scheme = parse_scheme(spec)
    if directory is None and not force and not sys.stdout.isatty():
        raise InvalidInput(
            "refusing to print identity shares to something that is not a terminal (a file "
            "or a pipe keeps them); use -o DIR for one file per share, or --force"
        )
    seed, _ = unlock(options.data_dir, read_passphrase(options.passphrase_file))
    share_passphrase = read_share_passphrase(
        use_share_passphrase, share_passphrase_file, confirm=True
    )
    shares = split_seed(seed, scheme, share_passphrase)
    summary: dict[str, Any] = {
        "identity_id": identity_id(seed),
        "scheme": scheme.describe(),
        "groups_needed": scheme.groups_needed,
        "groups": [
            {"name": g.name, "threshold": g.threshold, "count": g.count} for g in scheme.groups
        ],
        "share_passphrase": bool(share_passphrase),
    }
    if directory is not None:
        files = write_share_files(directory, scheme, shares)
        summary["directory"] = str(directory)
        summary["files"] = [
            {
                "file": str(path),
                "group": share.group.name,
                "group_number": share.group_number,
                "member_number": share.member_number,
            }
            for path, share in zip(files, shares, strict=True)
        ]
        if options.as_json:
            emit(options, "export", summary)
            return
        click.echo(f"Identity {summary['identity_id']}: {scheme.describe()} restore it.")
        for path, share in zip(files, shares, strict=True):
            click.echo(f"  {path}  ({share.label})")
        click.echo("Give each file to one person (and delete it here once handed over).")
        return
    if options.as_json:
        summary["shares"] = [
            {
                "group": share.group.name,
                "group_number": share.group_number,
                "member_number": share.member_number,
                "mnemonic": share.mnemonic,
            }
            for share in shares
        ]
        emit(options, "export", summary)
        return
    print_shares(summary["identity_id"], scheme, shares)


@click.command("import")
@click.option(
    "-i",
    "--input",
    "source",
    type=click.Path(path_type=Path, exists=False),
    default=None,
    help="An identity backup made by `dmgn export`.",
)
@click.option(
    "--shares",
    "from_shares",
    is_flag=True,
    help="Restore from SLIP-39 shares: read from the FILEs written by `dmgn export --shares "
    "-o DIR`, else typed one at a time (or piped, one per line, on stdin).",
)
@click.argument("share_files", nargs=-1, type=click.Path(path_type=Path), metavar="[FILE]...")
@share_passphrase_options
@click.option("--force", is_flag=True, help="Replace an existing identity in the data dir.")
@common
def import_identity(
    options: Options,
    source: Path | None,
    from_shares: bool,
    share_files: tuple[Path, ...],
    use_share_passphrase: bool,
    share_passphrase_file: Path | None,
    force: bool,
) -> None:
    """Import an identity from a backup (e.g. to set up a second device) or from shares."""
    dd = options.data_dir
    if (source is None) == (not from_shares):
        raise InvalidInput("say what to import from: -i FILE (a backup) or --shares [FILE]...")
    if share_files and not from_shares:
        raise InvalidInput("share files are read with --shares: dmgn import --shares FILE...")
    if source is not None and not source.exists():
        raise InvalidInput(f"{source} does not exist")
    if dd.vault.exists() and not force:
        raise AlreadyInitialized(
            f"an identity already exists in {dd.root}; use --force to replace it"
        )
    extra: dict[str, Any] = {}
    if source is not None:
        passphrase = read_passphrase(options.passphrase_file, prompt="Backup passphrase: ")
        seed = decrypt_seed(source.read_bytes(), passphrase, source=source, fmt=EXPORT_FORMAT)
    else:
        from dmgn.app.share_io import recover_from_files, recover_from_stdin

        recovery, used = recover_from_files(share_files) if share_files else recover_from_stdin()
        seed = recovery.seed(
            read_share_passphrase(use_share_passphrase, share_passphrase_file, confirm=False)
        )
        passphrase = read_passphrase(
            options.passphrase_file,
            prompt="New passphrase for this device's vault (min 8 chars): ",
            confirm=True,
        )
        check_passphrase(passphrase)
        extra = {"shares_used": used}
    dd.ensure()
    config = load_config(dd.config)
    with daemon.offline_access(dd, before="replacing the identity"):
        write_vault(dd.vault, encrypt_seed(seed, passphrase))
        device = load_or_create_device_id(dd.device)
    if not dd.config.exists():
        save_config(dd.config, config, dd.root)
    emit(
        options,
        "import-identity",  # not "import": that renderer is `dmgn add --jsonl`'s summary
        {
            "identity_id": identity_id(seed),
            "device_id": device.hex(),
            "data_dir": str(dd.root),
            **extra,
        },
    )


@click.command()
@click.option(
    "--new-passphrase-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Read the new passphrase from FILE (env DMGN_NEW_PASSPHRASE also works).",
)
@common
def passwd(options: Options, new_passphrase_file: Path | None) -> None:
    """Change the vault passphrase."""
    dd = options.data_dir
    seed, _ = unlock(dd, read_passphrase(options.passphrase_file, prompt="Current passphrase: "))
    new = read_passphrase(
        new_passphrase_file, prompt="New passphrase: ", confirm=True, env="DMGN_NEW_PASSPHRASE"
    )
    write_vault(dd.vault, encrypt_seed(seed, new))
    emit(options, "passwd", {"identity_id": identity_id(seed), "changed": True})


#: Registered on the `dmgn` group by dmgn.app.cli.
COMMANDS: tuple[click.Command, ...] = (
    init,
    export_identity,
    import_identity,
    passwd,
)
