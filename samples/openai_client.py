"""Talk to `lora-export serve` with the official `openai` package: two adapters, one of them streamed.

Start a server first, for example (a bank folder with two adapters):

    lora-export export-decoder ./base-model --adapter ./support --adapter ./legal --layout bank -o ./decoder
    lora-export serve ./decoder --adapter support=./support --adapter legal=./legal --api-key secret

then:

    python samples/openai_client.py --base-url http://127.0.0.1:8000/v1 --api-key secret

Each request's `model` picks the adapter (GET /v1/models lists them); requests for different adapters that
arrive together are generated in one batch on the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures

import openai


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key (any string when it has none)")
    parser.add_argument("--adapters", nargs=2, default=None, help="two adapter names (default: the first two served)")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    models = client.models.list().data
    base = next(m.id for m in models if m.parent is None)
    adapters = args.adapters or [m.id for m in models if m.parent == base][:2]
    if len(adapters) < 2:
        raise SystemExit(f"the server serves {len(adapters)} adapter(s); start it with two --adapter NAME=PATH")
    print(f"base model {base}; adapters: {', '.join(m.id for m in models if m.parent)}")

    # two adapters at once: the server puts both rows in one batch
    def complete(model: str) -> str:
        reply = client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0)
        return reply.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        texts = dict(zip(adapters, pool.map(complete, adapters)))
    for name, text in texts.items():
        print(f"[{name}] {args.prompt!r} -> {text!r}")

    # streaming: tokens arrive as they are generated
    streamed = []
    print(f"[{adapters[1]}, streamed] ", end="", flush=True)
    stream = client.completions.create(
        model=adapters[1], prompt=args.prompt, max_tokens=args.max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices:
            streamed.append(chunk.choices[0].text)
            print(chunk.choices[0].text, end="", flush=True)
    print()
    texts["streamed"] = "".join(streamed)
    print("streamed == non-streamed:", texts["streamed"] == texts[adapters[1]])
    return texts


if __name__ == "__main__":
    main()
