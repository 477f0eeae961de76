"""Shape bucketing (rollout.bucket): lengths rounded up to a multiple of the bucket and decode batches kept at
powers of two, so the shapes of forwards repeat and buffers MLX frees fit later requests."""


def round_up(n, bucket):
    """n rounded up to a multiple of bucket (n itself when bucket is 0)."""
    return -(-n // bucket) * bucket if bucket else n


def rows_bucket(live, bucket):
    """Rows a decode batch keeps for `live` unfinished sequences: the next power of two when bucketing."""
    return 1 << (live - 1).bit_length() if bucket and live > 0 else live
