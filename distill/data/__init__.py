"""Data: from text sources to the packed token stores training reads.

- `sources/`: what a source is (local files, parquet, a `datasets` stream), its documents and the policy
  for records that are not documents;
- `prepare/`: the `prepare` stage: encode (reader -> tokenizer worker pool -> ordered batches), pack into
  fixed-length sequences with a held-out split, the array-task parts and their pack step, the spec;
- `pairing/`: cross-tokenizer data: every student sequence also in the teacher's tokens, and which
  teacher position each student position is compared with;
- `corpus/`: the demo corpus built from files every Debian machine has;
- beside them what several of those and the later stages share: the tokenizer, the token store format,
  each token's bytes, the prepared-data reader and the domain mixture sampler.
"""
