"""The prompt-ensemble classifier: every (class, template) prompt tokenized and encoded once, in large batches.

At 10,000 classes and 12 templates (120,000 prompts) the cost is open_clip's tokenizer (ftfy and BPE in
Python, per prompt) and a text tower run over 77 positions of which a prompt fills about ten. So prompts are
put together from the tokens of their parts where that is exact, and the tower runs on positions up to the
longest prompt's end, which its causal mask makes exact too. Both are checked against open_clip in the tests.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from richkd.pipeline.clip import ClipTeacher, open_clip_library
from richkd.pipeline.execution import progress_bar

PROMPTS_PER_BATCH = 256
# Stands in for the class name when a template is cut around it (format() has resolved its {{ and }}).
SLOT = "\0"


def composable(text: str) -> bool:
    """Text whose cleaning by open_clip's tokenizer only changes case and spacing: printable ASCII, which ftfy
    leaves alone, with no `&` for html.unescape to read and no `|` of a special token such as <|endoftext|>."""
    return text.isascii() and text.isprintable() and "&" not in text and "|" not in text


def joins_cleanly(left: str, right: str) -> bool:
    """Whether CLIP's tokenizer splits left + right into the words of left, then those of right. Its words
    never hold whitespace, a digit stands alone, and a run of letters or of other characters stops at a
    change of kind; only an apostrophe before letters (the contractions 's, 're, ...) joins across one."""
    if not left or not right or left[-1].isspace() or right[0].isspace():
        return True

    def kind(character: str) -> str:
        return "letter" if character.isalpha() else "digit" if character.isdigit() else "other"

    before, after = kind(left[-1]), kind(right[0])
    if before == after:
        return before == "digit"
    return not (left[-1] == "'" and after == "letter")


def composes_prompts(tokenizer) -> bool:
    """Tokenizers whose prompts may be put together from their parts: open_clip's CLIP BPE tokenizer with its
    default cleaning (lower case or whitespace only) and truncation."""
    library = open_clip_library().tokenizer
    cleaners = [getattr(library, name, None) for name in ("_clean_lower", "_clean_whitespace")]
    return (isinstance(tokenizer, library.SimpleTokenizer) and tokenizer.reduction_fn is None
            and tokenizer.clean_fn in cleaners)


def prompt_tokens(tokenizer, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """Token ids (templates x classes, context) of every prompt `template.format(name)`, template by template,
    equal to `tokenizer(prompts)`. Where `composes_prompts` and the parts are `composable` and join cleanly,
    each class name and each side of each template is tokenized once and the prompt's ids are theirs in turn."""
    if not composes_prompts(tokenizer):
        prompts = [template.format(name) for template in templates for name in class_names]
        return torch.cat([tokenizer(prompts[i:i + PROMPTS_PER_BATCH])
                          for i in range(0, len(prompts), PROMPTS_PER_BATCH)])
    context = tokenizer.context_length
    tokens = np.zeros((len(templates), len(class_names), context), dtype=np.int64)
    names_composable = np.array([composable(name) for name in class_names], dtype=bool)
    name_ids = [tokenizer.encode(name) if ok else [] for name, ok in zip(class_names, names_composable)]
    name_lengths = np.array([len(ids) for ids in name_ids])
    names = np.zeros((len(class_names), max(name_lengths.max(), 1)), dtype=np.int64)
    for row, ids in enumerate(name_ids):
        names[row, :len(ids)] = ids
    classes = np.arange(len(class_names))
    for rows, template in zip(tokens, templates):
        prefix, _, suffix = template.format(SLOT).partition(SLOT)
        head = [tokenizer.sot_token_id, *tokenizer.encode(prefix)]
        tail = [*tokenizer.encode(suffix), tokenizer.eot_token_id]
        fits = len(head) + name_lengths + len(tail) <= context
        exact = names_composable & fits & np.array(
            [composable(prefix) and composable(suffix) and joins_cleanly(prefix, name) and joins_cleanly(name, suffix)
             for name in class_names], dtype=bool)
        if fits.any():
            rows[:, :len(head)] = head
            width = min(names.shape[1], context - len(head))
            rows[:, len(head):len(head) + width] = names[:, :width]
            fitting = classes[fits]
            rows[fitting[:, None], len(head) + name_lengths[fitting, None] + np.arange(len(tail))] = tail
        for row in np.flatnonzero(~exact):  # tokenized whole, truncated by open_clip if too long
            rows[row] = tokenizer([template.format(class_names[row])])[0].numpy()
    return torch.from_numpy(tokens.reshape(len(templates) * len(class_names), context))


def cuts_context(model) -> bool:
    """Models whose text embedding may be computed on the positions up to the last prompt's end: open_clip's
    CLIP text tower, causal and pooled at its end-of-text token (the largest id), whose positions after
    that token cannot change it."""
    return (type(model) is open_clip_library().CLIP and model.attn_mask is not None
            and model.text_pool_type == "argmax")


def encode_prompts(model, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised text embeddings of `tokens`, as open_clip's `encode_text(tokens, normalize=True)`; where
    `cuts_context`, over the positions up to the batch's last end-of-text token only."""
    if not cuts_context(model):
        return model.encode_text(tokens, normalize=True)
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = x[torch.arange(len(tokens), device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return F.normalize(x, dim=-1)


@torch.inference_mode()
def zero_shot_classifier(clip: ClipTeacher, class_names: list[str], templates: list[str],
                         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Class embeddings (C, D), the prompt-ensemble classifier, and each template's embeddings (C, P, D).

    The ensemble is the normalised mean of a class's normalised prompt embeddings, as open_clip's
    `build_zero_shot_classifier` computes it; a template's embedding of a class is that prompt's.
    """
    tokens = prompt_tokens(clip.tokenizer, class_names, templates)
    # Shortest first, so that each batch is cut close to the length of each of its prompts.
    by_length = torch.argsort(tokens.argmax(dim=-1), stable=True)
    batches = []
    with progress_bar("prompt") as progress:
        task = progress.add_task(f"prompts of {len(class_names)} classes", total=len(tokens))
        for start in range(0, len(tokens), PROMPTS_PER_BATCH):
            rows = by_length[start:start + PROMPTS_PER_BATCH]
            batches.append(encode_prompts(clip.model, tokens[rows].to(device)).float())
            progress.advance(task, len(rows))
    embeds = torch.cat(batches)[torch.argsort(by_length).to(device)]  # back to template-major order
    prompt_embeds = embeds.reshape(len(templates), len(class_names), -1).transpose(0, 1)
    return F.normalize(prompt_embeds.mean(dim=1), dim=-1), prompt_embeds
