"""The tests of Django's ``BaseCacheTests`` that shmcache skips, and why (read by
shmcache_backend_tests.py, and by tests/test_django.py to check the count)."""

SKIPPED = {
    "test_cull": "culling by entry count (OPTIONS MAX_ENTRIES / CULL_FREQUENCY) does not "
                 "apply: shmcache bounds a cache by bytes (OPTIONS memory) and evicts least "
                 "recently used entries when it is full",
    "test_zero_cull": "culling by entry count (MAX_ENTRIES with CULL_FREQUENCY=0) does not "
                      "apply: shmcache bounds a cache by bytes, not entries",
}
