"""Client commands: `sae-serve chat|complete|activations|saes|features|loadtest` (also `python -m clients ...`).

The service's URL and key come from --url / --api-key or $SAE_SERVE_URL / $SAE_SERVE_API_KEY; the key is never
printed. Steering: --steer SAE:FEATURE[@OP][@POSITIONS]=VALUE, repeatable, e.g. `--steer l15:1234=+8`,
`--steer l15:1234@clamp=3`, `--steer toy:7@mul@generated=0.5` (op add by default, positions all).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_ERROR = 1
EXIT_USAGE = 2


def _steer(text: str):
    from .request_models import SteeringEntry

    try:
        return SteeringEntry.parse(text)
    except ValueError as e:  # pydantic's ValidationError is one too
        raise argparse.ArgumentTypeError(str(e)) from None


def _reporting(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The service's errors (and refused arguments) as one line on stderr and an exit code, not a traceback."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        from .errors import SAEServeError

        try:
            return cmd(args)
        except SAEServeError as e:
            print(f"sae-serve {args.command}: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        except (ValidationError, ValueError) as e:
            print(f"sae-serve {args.command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE

    return run


def _client(args: argparse.Namespace):
    from .client import SAEServeClient

    return SAEServeClient(args.url, args.api_key, model=getattr(args, "model", None), timeout_s=args.timeout)


def _generate(args: argparse.Namespace, chat: bool) -> int:
    options = {
        "steering": args.steer or (),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    if args.features:
        from .request_models import LiveFeatures

        options["sae_features"] = LiveFeatures.parse(args.features, args.features_top_k, args.features_prompt)
    if chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        what = system + [{"role": "user", "content": args.text}]
    else:
        what = args.text
    with _client(args) as client:
        if args.features and not args.json:
            return _live_trace(client.chat_stream if chat else client.complete_stream, what, options)
        if args.stream:
            stream = client.chat_stream if chat else client.complete_stream
            for chunk in stream(what, **options):
                print(chunk.model_dump_json() if args.json else chunk.text, end="\n" if args.json else "", flush=True)
            if not args.json:
                print()
            return 0
        result = (client.chat if chat else client.complete)(what, **options)
        print(result.model_dump_json() if args.json else result.text)
    return 0


def _live_trace(stream: Callable, what, options: dict) -> int:
    """One line per token as it streams (position, token, per SAE its top features and the chosen ones), then the
    answer."""
    from .render import live_token_line

    text = []
    for chunk in stream(what, **options):
        for choice in chunk.choices:
            for token in choice.features or []:
                print(live_token_line(token), flush=True)
        text.append(chunk.text)
    print("".join(text))
    return 0


@_reporting
def _cmd_chat(args: argparse.Namespace) -> int:
    return _generate(args, chat=True)


@_reporting
def _cmd_complete(args: argparse.Namespace) -> int:
    return _generate(args, chat=False)


@_reporting
def _cmd_activations(args: argparse.Namespace) -> int:
    from .render import activations_table

    features = {sae: args.feature for sae in args.sae} if args.feature else None
    with _client(args) as client:
        result = client.activations(
            args.text,
            saes=args.sae,
            top_k=args.top_k,
            features=features,
            max_tokens=args.max_tokens,
            steering=args.steer or (),
        )
    print(result.model_dump_json() if args.json else activations_table(result))
    return 0


@_reporting
def _cmd_saes(args: argparse.Namespace) -> int:
    from .render import saes_table

    with _client(args) as client:
        saes = client.saes()
    print(saes.model_dump_json() if args.json else saes_table(saes))
    return 0


@_reporting
def _cmd_features(args: argparse.Namespace) -> int:
    from .render import feature_card

    with _client(args) as client:
        card = client.feature(args.sae, args.index, top_n=args.top_n)
    print(card.model_dump_json() if args.json else feature_card(card))
    return 0


@_reporting
def _cmd_loadtest(args: argparse.Namespace) -> int:
    import os

    from .client import DEFAULT_URL, KEY_ENV, URL_ENV
    from .load_config import LoadConfig
    from .loadtest import LoadTestRun, read_stats, run_loadtest, summary

    env = dict(os.environ)
    for flag, name in (
        (args.scenario, "SCENARIO"),
        (args.weights, "WEIGHTS"),
        (args.max_tokens, "MAX_TOKENS"),
        (args.sae, "SAE"),
    ):
        if flag is not None:
            env[f"SAE_SERVE_LOAD_{name}"] = str(flag)
    if args.api_key:
        env[KEY_ENV] = args.api_key
    run = LoadTestRun(
        host=(args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/"),
        out=args.out,
        users=args.users,
        spawn_rate=args.spawn_rate or max(1.0, args.users / 4),
        duration=args.duration,
        load=LoadConfig.from_env(env),
    )
    code = run_loadtest(run)
    print(summary(read_stats(run.out)))
    print(f"CSV: {run.out}/locust_stats.csv  HTML: {run.out}/report.html")
    return code


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=None, help="service base URL (default: $SAE_SERVE_URL or http://127.0.0.1:8000)"
    )
    common.add_argument("--api-key", default=None, help="API key (default: $SAE_SERVE_API_KEY); never printed")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    return common


def _generation_options() -> argparse.ArgumentParser:
    gen = argparse.ArgumentParser(add_help=False)
    gen.add_argument(
        "--steer",
        type=_steer,
        action="append",
        metavar="SAE:FEATURE[@OP][@POSITIONS]=VALUE",
        help="steer a feature (repeatable); OP add|clamp|mul|h_bias, POSITIONS all|prompt|generated",
    )
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--model", default=None, help="served model name (default: the one /v1/models lists)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument("--json", action="store_true", help="print the response (or each chunk) as JSON")
    gen.add_argument(
        "--features",
        action="append",
        metavar="SAE[:i,j]",
        help="stream each token's features at SAE (repeatable); i,j: features whose values every token shows",
    )
    gen.add_argument("--features-top-k", type=int, default=4, help="top features per token with --features (4)")
    gen.add_argument("--features-prompt", action="store_true", help="with --features, the prompt's tokens too")
    return gen


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the client commands on a `sae-serve` (or `python -m clients`) parser."""
    common, gen = _connection_options(), _generation_options()

    chat = subparsers.add_parser("chat", parents=[common, gen], help="chat with the served model (steerable)")
    chat.add_argument("text", help="the user message")
    chat.add_argument("--system", default=None, help="a system message before it")
    chat.set_defaults(func=_cmd_chat)

    complete = subparsers.add_parser("complete", parents=[common, gen], help="continue a text (steerable)")
    complete.add_argument("text", help="the prompt")
    complete.set_defaults(func=_cmd_complete)

    acts = subparsers.add_parser(
        "activations",
        parents=[common],
        help="per-token SAE feature activations of a text",
        description="Print a table: one row per token, its top features (FEATURE=VALUE) "
        "at each SAE, and the values of --feature indices.",
    )
    acts.add_argument("text", help="the text to read")
    acts.add_argument("--sae", action="append", required=True, help="SAE id (repeatable)")
    acts.add_argument("--top-k", type=int, default=5, help="top features per token and SAE (default 5)")
    acts.add_argument("--feature", type=int, action="append", help="also show this feature's value (repeatable)")
    acts.add_argument("--max-tokens", type=int, default=None, help="continue the text and read the new tokens too")
    acts.add_argument(
        "--steer",
        type=_steer,
        action="append",
        metavar="SAE:FEATURE[@OP][@POSITIONS]=VALUE",
        help="steer while reading (repeatable)",
    )
    acts.add_argument("--json", action="store_true", help="print the response as JSON")
    acts.set_defaults(func=_cmd_activations)

    saes = subparsers.add_parser("saes", parents=[common], help="list the loaded SAEs")
    saes.add_argument("--json", action="store_true", help="print the response as JSON")
    saes.set_defaults(func=_cmd_saes)

    features = subparsers.add_parser(
        "features", parents=[common], help="a feature's card: logit lens, density, top contexts"
    )
    features.add_argument("sae", help="SAE id")
    features.add_argument("index", type=int, help="feature index")
    features.add_argument("--top-n", type=int, default=None, help="tokens per side of the logit lens (default 10)")
    features.add_argument("--json", action="store_true", help="print the response as JSON")
    features.set_defaults(func=_cmd_features)

    load = subparsers.add_parser(
        "loadtest",
        parents=[common],
        help="run the locust scenarios headless for a while",
        description="Run clients/locustfile.py headless against the service and write "
        "OUT/locust_stats.csv (+ history, failures) and OUT/report.html; exit "
        "code 1 if any request failed.",
    )
    load.add_argument("--users", type=int, default=32, help="concurrent users (default 32)")
    load.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default users/4)")
    load.add_argument("--duration", default="3m", help="run time, e.g. 20s, 3m (default 3m)")
    load.add_argument(
        "--scenario",
        choices=("chat", "steered", "activations", "mixed"),
        default=None,
        help="what to send (default: $SAE_SERVE_LOAD_SCENARIO or mixed)",
    )
    load.add_argument("--weights", default=None, help="mix of `mixed`, e.g. chat=2,steered=2,activations=1")
    load.add_argument("--max-tokens", type=int, default=None, help="tokens per chat request (default 16)")
    load.add_argument("--sae", default=None, help="SAE to steer and read (default: the first loaded)")
    load.add_argument("--out", type=Path, default=Path("runs/loadtest"), help="report folder (default runs/loadtest)")
    load.set_defaults(func=_cmd_loadtest)


def main(argv: list[str] | None = None) -> int:
    """`python -m clients`: the client commands without the server's CLI."""
    parser = argparse.ArgumentParser(prog="sae-serve", description="sae-serve client commands.")
    add_client_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
