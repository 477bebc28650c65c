/* Per-layer readiness of one fetch, counted where the bytes land.
 *
 * Why: a pull thread receiving a range piece by piece (httpget.c) knows the moment each layer of
 * the range is checked and in place, long before the range ends. Counting that in C, with no GIL,
 * lets the layer's host-to-GPU copy start then, without a Python call per layer.
 *
 * st is one int64 array of 3n + 1 words for a fetch of n layers: landed[n] (ranges of each layer
 * in place), need[n] (ranges planned), ready_ns[n] (CLOCK_MONOTONIC when landed reached need;
 * 0 before), failed (non-zero once the fetch failed). Python's own arrivals go through
 * oc_layers_arrived too, so every writer is atomic.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <time.h>

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* One more range of layers [l0, l1) is checked and in place: release, so that a waiter that sees
 * the count also sees the bytes. */
void oc_layers_arrived(int64_t *st, int64_t n, int64_t l0, int64_t l1)
{
    for (int64_t l = l0; l < l1; l++)
        if (__atomic_add_fetch(&st[l], 1, __ATOMIC_ACQ_REL) == st[n + l])
            __atomic_store_n(&st[2 * n + l], now_ns(), __ATOMIC_RELEASE);
}

/* Wait until layer is in place (1), the fetch failed (-1) or timeout_ns passed (0). Polls every
 * 20 us for the first 100 polls (a layer behind the forward pass lands within milliseconds), then
 * every 200 us (a stalled server should not cost a core): only the thread that gates a layer's
 * host-to-GPU copy waits here, without the GIL. */
int64_t oc_layer_wait(const int64_t *st, int64_t n, int64_t layer, int64_t timeout_ns)
{
    int64_t deadline = now_ns() + timeout_ns;
    struct timespec nap = {0, 20000};
    for (int polls = 0;; polls++) {
        if (polls == 100)
            nap.tv_nsec = 200000;
        if (__atomic_load_n(&st[3 * n], __ATOMIC_ACQUIRE))
            return -1;
        if (__atomic_load_n(&st[layer], __ATOMIC_ACQUIRE) >= st[n + layer])
            return 1;
        if (now_ns() >= deadline)
            return 0;
        nanosleep(&nap, NULL);
    }
}
