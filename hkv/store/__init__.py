"""The LMDB store: block records and the rows beside them, below the tiers and the sessions.

``block_store`` opens, creates and upgrades the environment and reads and writes block records
(``BlockStore``); ``writer`` is its one writer thread; ``read_hints`` the kernel read-ahead and
page release; ``txn`` one transaction's view of the databases (refs, usage); ``summary_rows``
the blocks' summaries; ``checksum`` the small rows' checksum. Layout: docs/store.md.
"""
