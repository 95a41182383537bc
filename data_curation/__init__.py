"""Data curation for EVE pre-training (SPEC section 3): `eve-curate` scan, filter, embed, cluster,
select, caption, export, each in resumable shards, with every item's fate counted in summary.json.

Folder layout under --out (shard i of every stage holds the items of scan shard i):
scan/ filter/ embed/ cluster/ select/ caption/ export/, summary.json, cluster_sizes.png.
"""
