"""The ``fflayers`` command: one entry point for every analysis, grouped as ``fflayers GROUP COMMAND``.

Each command takes the flags of the ``analysis/*.py`` script it replaces (same parser-building code, same
outputs): ``memories mine`` = generate_outputs.py, ``memories textual`` =
trigger_examples_jsonl_to_textual.py, ``memories agreement`` = key_value_agreement.py, ``memories plot`` =
plot_memories.py, ``recall SUB`` = dissect_recall.py SUB, ``shortcuts SUB`` = linear_shortcuts.py SUB,
``neurons`` = knowledge_neurons.py, ``embedding SUB`` = embedding_space.py SUB, ``merge`` = merge_shards.py;
``lenses SUB`` and ``explore`` have no script of their own.
The modules are imported only when their command runs, so ``fflayers --help`` is quick.
"""

from __future__ import annotations

from collections.abc import Sequence

from fflayers import __version__
from fflayers.cli.common import Command, dispatch

__all__ = ["COMMANDS", "DESCRIPTION", "PROG", "main"]

PROG = "fflayers"
DESCRIPTION = ("Open up transformer LMs: feed-forward layers as key-value memories, factual recall, linear\n"
               "shortcuts, knowledge neurons, parameters in embedding space.\n\n"
               "'fflayers GROUP --help' lists a group's commands, 'fflayers GROUP COMMAND --help' a "
               "command's flags.")

MEMORIES = (
    Command("mine", "trigger examples of FFN keys, or layer / value predictions, over a corpus "
            "(generate_outputs.py)",
            ("fflayers memories mine --hf_model gpt2 --data_file wiki.valid.tokens --get_trigger_examples "
             "--output_file top50.jsonl",), module="memories_mine"),
    Command("textual", "trigger-examples JSONL -> one text file per key "
            "(trigger_examples_jsonl_to_textual.py)",
            ("fflayers memories textual --hf_model gpt2 --input_file top50.jsonl "
             "--output_dir top50_textual",),
            module="memories_textual"),
    Command("agreement", "agreement of each value's top prediction with its key's trigger examples "
            "(key_value_agreement.py)",
            ("fflayers memories agreement --hf_model gpt2 --data_dir top50_textual --output_base kv "
             "--random_baseline",), module="memories_agreement"),
    Command("plot", "figures and per-layer tables of the memory analyses (plot_memories.py)",
            ("fflayers memories plot --agreement_tsv kv.tsv --baseline_tsv kv_random.tsv "
             "--output_dir figures",),
            module="memories_plot"),
)

COMMANDS = (
    Command("memories", "feed-forward layers as key-value memories: trigger examples, textual files, "
            "key-value agreement, figures", tuple(c.examples[0] for c in MEMORIES), commands=MEMORIES),
    Command("recall", "dissecting factual recall: facts, attention knockout, projections, attribute "
            "extraction, subject enrichment, sublayer knockout, figures (dissect_recall.py)",
            ("fflayers recall facts --hf_model gpt2 --countries --filter --output known.json",
             "fflayers recall knockout --hf_model gpt2 --facts known.json --output knockout.parquet",
             "fflayers recall project --hf_model gpt2 --facts known.json --positions subject_last last "
             "--output projections.parquet",
             "fflayers recall extraction --hf_model gpt2 --facts known.json --variants none block_subject "
             "--output extraction.parquet",
             "fflayers recall enrichment --hf_model gpt2 --facts known.json --paragraphs wiki.txt "
             "--output enrichment.parquet",
             "fflayers recall sublayer-knockout --hf_model gpt2 --facts known.json --paragraphs wiki.txt "
             "--output sublayer_knockout.parquet",
             "fflayers recall plot --kind knockout --input knockout.parquet --output knockout"),
            module="recall"),
    Command("shortcuts", "linear shortcuts between layers: fit, r2, evaluate, early exit, submodules, "
            "figures (linear_shortcuts.py)",
            ("fflayers shortcuts all --hf_model gpt2 --data_file wiki.train.tokens "
             "--output_dir shortcuts_gpt2",
             "fflayers shortcuts plot --output_dir shortcuts_gpt2"), module="shortcuts"),
    Command("neurons", "knowledge neurons of facts and the effect of suppressing / enhancing them "
            "(knowledge_neurons.py)",
            ("fflayers neurons --hf_model bert-base-uncased --facts pararel.jsonl --output kn/results.json",),
            module="neurons"),
    Command("embedding", "parameters in embedding space: keys, values, heads, t-SNE maps, neurons vs hidden "
            "states, export (embedding_space.py)",
            ("fflayers embedding values --hf_model gpt2 --layers 10 11 --neurons 0 1 2 --k 20",
             "fflayers embedding heads --hf_model gpt2 --layers 9 --heads 8 --kind ov --n 50",
             "fflayers embedding export --hf_model gpt2 --k 20 --output_file values.parquet"),
            module="embedding"),
    Command("lenses", "lenses compared: train a tuned / hybrid lens, evaluate the logit, mat, tuned, hybrid "
            "lenses and a token-identity Patchscope on the same tokens, figures",
            ("fflayers lenses train --hf_model gpt2 --data_file wiki.train.tokens --output_dir lens_tuned",
             "fflayers lenses compare --hf_model gpt2 --data_file wiki.valid.tokens --tuned lens_tuned "
             "--output lenses.parquet --figure lenses",
             "fflayers lenses plot --input lenses.parquet --output lenses"), module="lenses"),
    Command("explore", "the explorer: a local web page to trace a prompt through the layers, read and switch "
            "memories, search them",
            ("fflayers explore --hf_model gpt2 --memories top50_textual --agreement kv.tsv",),
            module="explore"),
    Command("merge", "merge the partials of a 'memories mine --shard I/N' job array (merge_shards.py)",
            ("fflayers merge --output_file top50.jsonl",), module="merge"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fflayers`` console script; returns the exit code (2 for bad input, with one line on stderr)."""
    examples = "examples:\n" + "".join(f"  {c.examples[0]}\n" for c in COMMANDS)
    return dispatch(PROG, DESCRIPTION, COMMANDS, argv, examples, version=__version__)
