/* Batched copies and xxh3-64 checksums for objectcache, called through ctypes.CDLL, which releases
 * the GIL for the whole call: one release per range or object instead of two per piece. Inside
 * SGLang the scheduler thread keeps the GIL busy, and every re-acquisition can wait a switch
 * interval (5 ms), so per-piece calls were the bottleneck of the read path.
 *
 * The hash function is passed in (xxhash's own XXH3_64bits from the xxhash package), so the
 * checksums are the library's and this file carries no hash implementation.
 */
#include <stdint.h>
#include <string.h>

typedef uint64_t (*oc_hash_fn)(const void *, size_t);

/* copies: n_copies (dst, src, len) triples. pieces: n_pieces addresses of piece_len bytes each.
 * hash == NULL: no checksums, just the copies. verify != 0 with first != NULL: piece i is hashed
 * and compared with expect[i], then its copies (copies[first[i]] up to copies[first[i + 1]]) are
 * done while the piece is still in the core's cache (one pass over memory, not two); on the first
 * mismatch return its index, that piece and every later one not copied. verify != 0 without first:
 * hash every piece, then copy; a mismatch copies nothing. verify == 0: copy first, then write the
 * pieces' checksums to out[].
 * Returns -1 when done. */
int64_t oc_copy_hash(const uint64_t *copies, int64_t n_copies, const uint64_t *pieces,
                     int64_t n_pieces, uint64_t piece_len, const uint64_t *expect, uint64_t *out,
                     oc_hash_fn hash, int verify, const int64_t *first)
{
    int64_t i, c;
    if (hash != NULL && verify && first != NULL) {
        for (i = 0; i < n_pieces; i++) {
            if (hash((const void *)(uintptr_t)pieces[i], piece_len) != expect[i])
                return i;
            for (c = first[i]; c < first[i + 1]; c++)
                memcpy((void *)(uintptr_t)copies[3 * c], (const void *)(uintptr_t)copies[3 * c + 1],
                       (size_t)copies[3 * c + 2]);
        }
        return -1;
    }
    if (hash != NULL && verify) {
        for (i = 0; i < n_pieces; i++)
            if (hash((const void *)(uintptr_t)pieces[i], piece_len) != expect[i])
                return i;
    }
    for (i = 0; i < n_copies; i++)
        memcpy((void *)(uintptr_t)copies[3 * i], (const void *)(uintptr_t)copies[3 * i + 1],
               (size_t)copies[3 * i + 2]);
    if (hash != NULL && !verify) {
        for (i = 0; i < n_pieces; i++)
            out[i] = hash((const void *)(uintptr_t)pieces[i], piece_len);
    }
    return -1;
}
