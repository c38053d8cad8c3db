"""Step 2: rewrite each description with a chat LLM and the paper's refine prompt (docs/method.md §5).

Two backends: any OpenAI-compatible chat-completions endpoint (`--base-url`), or a local
transformers chat model (`--local-model`). The raw and the refined text are kept side by side.

Failures, by kind:
- 429, 5xx, timeouts and dropped connections are retried with exponential backoff (honouring
  `Retry-After`). An item that still fails gets no record, so the next run tries it again; after
  `max_consecutive_failures` such items in a row the run stops (the server is down).
- Other 4xx answers about one item (400, 413, 422) and malformed responses are recorded with their
  `error`; `--retry-failed` tries those again.
- 401, 403 and 404 mean the endpoint, model or key is wrong: the run stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from minigpt4.commands.ranks import Rank, RankedJsonl, RowSink, job_digest
from minigpt4.curate.records import CurateError, WorkDir, latest_by_id, read_jsonl

log = logging.getLogger(__name__)

REFINE_PROMPT = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, "
    "not English sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. "
    "Return directly the results without explanation. "
    "Return directly the input paragraph if it is already correct without explanation."
)
FATAL_STATUS = (401, 403, 404)


# With `--facts`: what is known of the image, after the paper's prompt, so that the refine step also
# corrects what the stage-1 model got wrong (the data's provenance must say so).
FACTS_PROMPT = "These facts about the image are correct; fix any sentence that contradicts them: {facts}"


def refine_messages(paragraph: str, facts: str | None = None) -> list[dict[str, str]]:
    """The chat messages that ask for one paragraph to be refined (against the image's facts, if known)."""
    prompt = f"{REFINE_PROMPT} {FACTS_PROMPT.format(facts=facts)}" if facts else REFINE_PROMPT
    return [{"role": "user", "content": f"{prompt}\n\n{paragraph}"}]


def read_facts(path: Path) -> dict[str, dict[str, Any]]:
    """{image_id: {"facts", "truth"?}} from a JSONL file of {"image_id", "facts", "truth"?} rows.

    `truth` (optional: the words that name the main object, the colours shown, whether people and
    animals may appear) is kept with each refined record for `curate filter`'s `facts` rule.
    """
    if not path.is_file():
        raise CurateError(f"--facts {path}: no such file")
    facts = {}
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("image_id"), str) or not isinstance(row.get("facts"), str):
            raise CurateError(f"{path}: row {n} needs a string image_id and facts")
        truth = row.get("truth")
        if truth is not None and not _is_truth(truth):
            raise CurateError(
                f"{path}: row {n}: truth needs objects and colours (lists of words), people and animals (true/false)"
            )
        facts[row["image_id"]] = {"facts": row["facts"], **({"truth": truth} if truth else {})}
    return facts


def _is_truth(truth: object) -> bool:
    if not isinstance(truth, dict):
        return False
    lists = all(
        isinstance(truth.get(k), list) and all(isinstance(w, str) for w in truth[k])
        for k in ("objects", "colours")
    )
    return lists and all(isinstance(truth.get(k), bool) for k in ("people", "animals"))


def _known(item: dict[str, Any]) -> dict[str, Any]:
    """The facts (and truth) of an item that the refined record keeps."""
    return {k: item[k] for k in ("facts", "truth") if item.get(k)}


class TransientError(Exception):
    """The server did not answer in time or was overloaded, even after every retry."""


class ItemError(Exception):
    """The server refused or garbled this one item; retrying it now would not help."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_s: float = 1.0  # wait before the 2nd attempt; doubles each time
    max_backoff_s: float = 60.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based), with ±50% jitter."""
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff_s)
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s) * random.uniform(0.5, 1.5)


class OpenAIChatClient:
    """A minimal asynchronous client of `POST {base_url}/chat/completions`."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        sampling: dict[str, Any] | None = None,
    ):
        self.model = model
        self.retry = retry or RetryPolicy()
        self.sampling = sampling or {}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
        )

    async def complete(self, messages: list[dict[str, str]]) -> tuple[str, int]:
        """The assistant's reply and the number of attempts it took."""
        body = {"model": self.model, "messages": messages, **self.sampling}
        for attempt in range(1, self.retry.max_attempts + 1):
            retry_after = None
            try:
                response = await self._http.post("/chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if response.status_code == 200:
                    return _reply_text(response), attempt
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code in FATAL_STATUS:
                    raise CurateError(
                        f"{response.request.url} answered {problem}; check --base-url, --model and the API key"
                    )
                if response.status_code != 429 and response.status_code < 500:
                    raise ItemError(problem)
                retry_after = response.headers.get("retry-after")
            if attempt == self.retry.max_attempts:
                raise TransientError(f"{problem} (gave up after {attempt} attempts)")
            delay = self.retry.delay(attempt, retry_after)
            log.info("attempt %d failed (%s); retrying in %.1f s", attempt, problem, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()


def _reply_text(response: httpx.Response) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ItemError(f"malformed chat-completions response: {response.text[:300]}") from e
    if not isinstance(content, str):
        raise ItemError(f"message content is not text: {content!r:.300}")
    return content.strip()


class LocalChatModel:
    """A transformers chat model that refines paragraphs in left-padded batches."""

    def __init__(
        self,
        model: str,
        gguf_file: str | None = None,
        device: str | None = None,
        max_new_tokens: int = 400,
        temperature: float | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, gguf_file=gguf_file)
        except OSError as e:
            raise CurateError(f"cannot load the chat model {model!r}: {e}") from e
        if not self.tokenizer.chat_template:
            raise CurateError(f"{model} has no chat template; use a chat (instruct) model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.float32 if self.device == "cpu" else torch.float16
        self.model = AutoModelForCausalLM.from_pretrained(model, gguf_file=gguf_file, dtype=dtype).to(
            self.device
        )
        self.model.eval()
        self.generation = {"max_new_tokens": max_new_tokens, "do_sample": bool(temperature)}
        if temperature:
            self.generation["temperature"] = temperature

    def complete_batch(self, conversations: Sequence[list[dict[str, str]]]) -> list[str]:
        """The model's reply to each conversation, decoded together."""
        import torch

        prompts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations
        ]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        with torch.inference_mode():
            out = self.model.generate(**batch, **self.generation, pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _refine_key(record: dict[str, Any]) -> tuple[str, str]:
    """A refinement belongs to one text of one image: re-generated text is refined anew."""
    return record.get("image_id"), record.get("raw")


def pending_items(work: WorkDir, retry_failed: bool) -> list[dict[str, Any]]:
    """Generated descriptions that have no refinement of their current text yet."""
    generated = [
        r for r in latest_by_id(read_jsonl(work.require(work.generate, "generate"))).values() if "raw" in r
    ]
    refined = latest_by_id(read_jsonl(work.refine))
    pending = []
    for record in generated:
        previous = refined.get(record["image_id"])
        if previous is None or previous["raw"] != record["raw"] or (retry_failed and "error" in previous):
            pending.append(record)
    return pending


async def refine_remote(
    client: OpenAIChatClient,
    items: list[dict[str, Any]],
    out: RowSink,
    concurrency: int = 4,
    max_consecutive_failures: int = 5,
) -> dict[str, int]:
    """Refine `items` with at most `concurrency` requests in flight, writing each record as it lands."""
    counts = {"refined": 0, "failed": 0, "left_for_next_run": 0}
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    consecutive = 0

    async def worker() -> None:
        nonlocal consecutive
        while not queue.empty():
            item = queue.get_nowait()
            record = {
                "image_id": item["image_id"],
                "raw": item["raw"],
                "backend": "openai",
                "model": client.model,
                **_known(item),
            }
            try:
                messages = refine_messages(item["raw"], item.get("facts"))
                record["refined"], record["attempts"] = await client.complete(messages)
            except TransientError as e:
                log.warning("%s: %s; left for the next run", item["image_id"], e)
                counts["left_for_next_run"] += 1
                consecutive += 1
                if consecutive >= max_consecutive_failures:
                    raise CurateError(f"{consecutive} items in a row failed ({e}); is the server up?") from e
                continue
            except ItemError as e:
                log.warning("%s: %s", item["image_id"], e)
                record["error"] = str(e)
                counts["failed"] += 1
            else:
                counts["refined"] += 1
            consecutive = 0
            out.write(record)
            out.advance()

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
    return counts


def refine_local(
    model: LocalChatModel, items: list[dict[str, Any]], out: RowSink, batch_size: int = 4
) -> dict[str, int]:
    """Refine `items` with a local model, writing the records of each batch as it finishes."""
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        replies = model.complete_batch([refine_messages(item["raw"], item.get("facts")) for item in batch])
        for item, reply in zip(batch, replies, strict=True):
            out.write(
                {
                    "image_id": item["image_id"],
                    "raw": item["raw"],
                    "refined": reply,
                    "backend": "local",
                    "model": model.name,
                    **_known(item),
                }
            )
        out.advance(len(batch))
    return {"refined": len(items), "failed": 0, "left_for_next_run": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    where.add_argument(
        "--local-model", help="a transformers chat model: a folder or a hub id already in the cache"
    )
    parser.add_argument("--model", default="gpt-3.5-turbo", help="the model name sent to --base-url")
    parser.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (none sent when unset)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--max-attempts", type=int, default=6, help="tries per item on 429, 5xx and timeouts")
    parser.add_argument(
        "--backoff", type=float, default=1.0, help="seconds before the first retry; doubles each time"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="default: the server's / greedy locally"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="reply length cap (local default: 400)")
    parser.add_argument(
        "--gguf-file", default=None, help="with --local-model: the GGUF file inside that folder"
    )
    parser.add_argument("--device", default=None, help="with --local-model: cpu, cuda, …")
    parser.add_argument("--batch-size", type=int, default=4, help="with --local-model: paragraphs per batch")
    parser.add_argument(
        "--retry-failed", action="store_true", help="try again the items recorded with an error"
    )
    parser.add_argument(
        "--facts",
        type=Path,
        default=None,
        help='a JSONL file of {"image_id", "facts", "truth"?}: what is known of each image, given to the LLM '
        "to correct against (and, with truth, checked by `curate filter`'s facts rule)",
    )


def run(args: argparse.Namespace, work: WorkDir) -> int:
    """`curate refine`: rewrite the generated descriptions with a chat LLM."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the progress bar
    pending = pending_items(work, args.retry_failed)
    if args.facts is not None:
        facts = read_facts(args.facts)
        pending = [
            {**item, **facts[item["image_id"]]} if item["image_id"] in facts else item for item in pending
        ]
    if not pending:
        print(f"refine: nothing to do → {work.refine}")
        return 0
    rank = Rank.from_env()
    job = job_digest([(item["image_id"], item["raw"]) for item in pending], vars(args), rank.world)
    ranked = RankedJsonl(work.refine, rank, _refine_key, job)
    done = ranked.done_keys()  # pending_items judged the output (and --retry-failed)
    items = [item for item in rank.share(pending) if _refine_key(item) not in done]
    log.info("%s: %d of %d descriptions to refine", rank.name, len(items), len(pending))
    with ranked.rows(len(pending), "refine", "text") as out:
        if args.base_url:
            sampling = {
                k: v
                for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens))
                if v is not None
            }
            client = OpenAIChatClient(
                args.base_url,
                args.model,
                api_key=os.environ.get(args.api_key_env),
                timeout_s=args.timeout,
                retry=RetryPolicy(args.max_attempts, args.backoff),
                sampling=sampling,
            )
            counts = asyncio.run(refine_remote(client, items, out, args.concurrency))
        else:
            model = LocalChatModel(
                args.local_model,
                args.gguf_file,
                rank.device(args.device),
                args.max_tokens or 400,
                args.temperature,
            )
            counts = refine_local(model, items, out, args.batch_size)
    if rank.main:
        ranked.merge([_refine_key(item) for item in pending])
    else:
        return 1 if counts["left_for_next_run"] else 0
    print(
        f"refine: {counts['refined']} refined, {counts['failed']} refused by the server, "
        f"{counts['left_for_next_run']} left for the next run → {work.refine}"
    )
    return 1 if counts["left_for_next_run"] else 0
