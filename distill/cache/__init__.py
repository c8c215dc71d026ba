"""The offline teacher logit cache: format, extraction under tensor parallelism, writer, reader."""
