"""Logprobs in the APIs' shapes, from what the engine keeps on each request (`Request.output_logprobs`
and friends; engine.py defines the values: SGLang's, exactly the target's whatever K).

Native /generate mirrors SGLang's tokenizer manager: `input_token_logprobs` / `output_token_logprobs`
as [logprob, token_id, text or None], `input_top_logprobs` / `output_top_logprobs` per position a
list of those (None where SGLang has None), `input_token_ids_logprobs` / `output_token_ids_logprobs`
when token_ids_logprob is given. Streams carry them cumulatively, as SGLang does by default.
"""

from __future__ import annotations

_TEXT_CACHE: dict[int, dict[int, str]] = {}


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded on its own (SGLang's batch_decode of [[id], ...]), cached per tokenizer."""
    cache = _TEXT_CACHE.setdefault(id(tokenizer), {})
    missing = [i for i in dict.fromkeys(ids) if i not in cache]
    if missing:
        for i, t in zip(missing, tokenizer.batch_decode([[i] for i in missing])):
            cache[i] = t
    return [cache[i] for i in ids]


def _triples(tokenizer, vals, ids, with_text: bool) -> list[list]:
    texts = token_texts(tokenizer, ids) if with_text else [None] * len(ids)
    return [[v, i, t] for v, i, t in zip(vals, ids, texts)]


def _tops(tokenizer, rows, with_text: bool) -> list:
    return [None if row is None or not row[0] else _triples(tokenizer, row[0], row[1], with_text) for row in rows]


def _ids_rows(tokenizer, rows, want: list[int], with_text: bool) -> list:
    return [None if row is None else _triples(tokenizer, row, want, with_text) for row in rows]


def output_count(req, limit: int | None = None) -> int:
    """Output positions whose logprobs are complete (the engine thread may be mid-append)."""
    p = req.params
    n = min(len(req.output_ids), len(req.output_logprobs))
    if p.top_logprobs_num:
        n = min(n, len(req.output_top_logprobs))
    if p.token_ids_logprob is not None:
        n = min(n, len(req.output_token_ids_logprobs))
    return n if limit is None else min(n, limit)


def native_logprob_meta(req, tokenizer, with_text: bool, limit: int | None = None) -> dict:
    """SGLang's logprob keys of meta_info (empty unless the request asked for logprobs); `limit`
    caps the output positions (a stream sends what the last published step committed)."""
    p = req.params
    if not p.return_logprob:
        return {}
    n = output_count(req, limit)
    out_ids = req.output_ids[:n]
    in_ids = req.input_logprob_ids
    meta = {
        "input_token_logprobs": _triples(tokenizer, req.input_logprobs, in_ids, with_text),
        "output_token_logprobs": _triples(tokenizer, req.output_logprobs[:n], out_ids, with_text),
        "output_token_logprobs_length": n,
    }
    if p.top_logprobs_num:
        meta["input_top_logprobs"] = _tops(tokenizer, req.input_top_logprobs, with_text)
        meta["output_top_logprobs"] = _tops(tokenizer, req.output_top_logprobs[:n], with_text)
    if p.token_ids_logprob is not None:
        want = list(p.token_ids_logprob)
        meta["input_token_ids_logprobs"] = _ids_rows(tokenizer, req.input_token_ids_logprobs, want, with_text)
        meta["output_token_ids_logprobs"] = _ids_rows(tokenizer, req.output_token_ids_logprobs[:n], want, with_text)
    return meta


# ---- OpenAI ----------------------------------------------------------------------------------------
def completion_logprobs(req, tokenizer, echo: bool, start: int = 0, end: int | None = None, offset: int = 0) -> dict:
    """choices[i].logprobs of /v1/completions: {tokens, token_logprobs, top_logprobs, text_offset}
    over output positions start..end, preceded by the prompt's (first one null) when `echo`.
    text_offset: where each token's text starts in the choice's text (from `offset`), counting the
    tokens' own texts."""
    end = output_count(req, end)
    vals = list(req.output_logprobs[start:end])
    ids = list(req.output_ids[start:end])
    tops = list(req.output_top_logprobs[start:end]) if req.params.top_logprobs_num else [None] * len(ids)
    if echo:
        vals = list(req.input_logprobs) + vals
        ids = list(req.input_logprob_ids) + ids
        in_tops = list(req.input_top_logprobs) if req.params.top_logprobs_num else [None] * len(req.input_logprobs)
        tops = in_tops + tops
    texts = token_texts(tokenizer, ids)
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    top_dicts = []
    for j, row in enumerate(tops):
        if row is None:
            top_dicts.append(None if vals[j] is None else {})
        else:
            top_dicts.append(dict(zip(token_texts(tokenizer, row[1]), row[0])))
    return {"tokens": texts, "token_logprobs": vals, "top_logprobs": top_dicts, "text_offset": offsets}


def chat_logprobs(req, tokenizer, start: int = 0, end: int | None = None) -> dict:
    """choices[i].logprobs of /v1/chat/completions over output positions start..end."""
    end = output_count(req, end)
    ids = req.output_ids[start:end]
    texts = token_texts(tokenizer, ids)
    content = []
    for j, text in enumerate(texts):
        alts = []
        if req.params.top_logprobs_num:
            vals, alt_ids = req.output_top_logprobs[start + j]
            alts = [
                {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                for v, t in zip(vals, token_texts(tokenizer, alt_ids))
            ]
        content.append(
            {
                "token": text,
                "logprob": req.output_logprobs[start + j],
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": alts,
            }
        )
    return {"content": content}
