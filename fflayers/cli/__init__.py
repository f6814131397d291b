"""Command-line tools: the ``fflayers`` command (:mod:`fflayers.cli.main`), one module per analysis group,
and the shared pieces of :mod:`fflayers.cli.common`, re-exported here."""

from fflayers.cli.common import (
    CLIError,
    Command,
    Parser,
    add_model_args,
    check_model_args,
    dispatch,
    load_adapter,
    prog_name,
    quiet_loading,
    run_command,
    run_main,
)

__all__ = ["CLIError", "Command", "Parser", "add_model_args", "check_model_args", "dispatch", "load_adapter",
           "prog_name", "quiet_loading", "run_command", "run_main"]
