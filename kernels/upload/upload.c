// Expert upload engine: page cache -> pinned host buffers -> GPU memory.
//
// A persistent pool of threads, each with two pinned buffers and its own
// stream. One call uploads a list of experts of one layer file: every expert
// is cut into pieces of at most `piece` bytes, the threads take pieces in
// turn, read each with preadv (RWF_NOWAIT first, to count page-cache hits)
// into one buffer while the copy of the previous piece out of the other is
// in flight, and queue one async copy per component the piece overlaps,
// straight to the expert's row in the destination pool. The call returns
// once every stream is drained.
//
// Direct mode (no copy function given: CPU and unified memory): each piece is read
// with one preadv straight into the components' rows, no staging. A direct job can
// also run in the background (fm_upload_start): pieces are taken in expert order, a
// counter per expert says when it has landed (fm_upload_wait_expert), so the caller
// computes with the first experts while the later ones are still being read.
//
// Asynchronous direct jobs (fm_upload_start_async, after fm_uploader_async): one thread keeps up
// to `depth` pieces in flight through Linux native AIO (io_submit / io_getevents on an O_DIRECT
// descriptor, raw syscalls), in expert order, and counts each expert's pieces as they complete.
// The other threads sleep through such a job: one thread's wake-up per job instead of all of
// theirs. (What made direct reads fast was not this but the destination: buffers on huge pages,
// so that a request is not cut at max_segments 4 KiB pages; see llm_flashmoe/cpu/DESIGN.md.)
//
// The CUDA runtime is not linked: the caller passes cudaMemcpyAsync and
// cudaStreamSynchronize (taken from the libcudart that MLX loaded), so the
// library builds with any C compiler and no CUDA headers. fm_host_memcpy_async
// and fm_host_stream_sync carry the same calls out in host memory (tests).
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#define FM_HAVE_AIO 1
#endif

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

typedef int (*fm_memcpy_async_fn)(void *dst, const void *src, size_t n, int kind, void *stream);
typedef int (*fm_sync_fn)(void *stream);
struct fm_uploader;
int64_t fm_upload_start(struct fm_uploader *u, int fd, const int64_t *file_offset, const int64_t *row, int64_t n,
                        int64_t expert_bytes, int ncomp, const int64_t *comp_offset, const int64_t *comp_nbytes,
                        const uint64_t *comp_base, int64_t piece, int probe, int64_t *landed);
int64_t fm_upload_finish(struct fm_uploader *u);

enum { H2D = 1 };

typedef struct {
  // the job, set by fm_upload_run
  int fd, ncomp, probe;
  const int64_t *file_offset, *row;
  int64_t n_experts, expert_bytes, piece, pieces_per_expert, n_pieces;
  const int64_t *comp_offset, *comp_nbytes;
  const uint64_t *comp_base;
  atomic_llong next, hit_bytes;
  atomic_int error;
  atomic_llong *landed;  // per expert: pieces done (direct mode; NULL: not counted)
  int async;             // read through the uploader's AIO context, on worker 0 alone
} fm_job;

typedef struct fm_uploader {
  int nthreads;
  int64_t piece_cap;
  void **pinned;   // 2 per thread
  void **streams;  // 1 per thread
  fm_memcpy_async_fn memcpy_async;
  fm_sync_fn stream_sync;
  pthread_t *threads;
  pthread_mutex_t mu;
  pthread_cond_t start, done, progress;
  pthread_cond_t start0;  // worker 0's own: an asynchronous job wakes it alone
  int64_t generation;
  unsigned long aio_ctx;  // AIO context (0: none), `aio_depth` requests at most
  int aio_depth;
  int running, stop;
  fm_job job;
} fm_uploader;

typedef struct {
  fm_uploader *u;
  int index;
} fm_worker_arg;

// Read nbytes at offset into dst; 1 if the page cache served all of it, 0 if not, -errno on failure.
static int read_piece(int fd, char *dst, int64_t offset, int64_t nbytes, int probe) {
  int64_t done = 0;
  if (probe) {
    struct iovec v = {dst, (size_t)nbytes};
    ssize_t r = preadv2(fd, &v, 1, offset, RWF_NOWAIT);
    if (r == nbytes) return 1;
    if (r > 0) done = r;
  }
  while (done < nbytes) {
    ssize_t r = pread(fd, dst + done, (size_t)(nbytes - done), offset + done);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) return -EIO;  // the file ends early: truncated while in use
    done += r;
  }
  return 0;
}

// Read nbytes at offset straight into the iovecs (direct mode); 1 / 0 / -errno as read_piece.
static int read_iov(int fd, struct iovec *iov, int niov, int64_t offset, int64_t nbytes, int probe) {
  int64_t done = 0;
  if (probe) {
    ssize_t r = preadv2(fd, iov, niov, offset, RWF_NOWAIT);
    if (r == nbytes) return 1;
    if (r > 0) done = r;
  }
  while (done < nbytes) {
    int first = 0;  // skip what is done
    int64_t skip = done;
    while (first < niov && skip >= (int64_t)iov[first].iov_len) skip -= (int64_t)iov[first++].iov_len;
    iov[first].iov_base = (char *)iov[first].iov_base + skip;
    iov[first].iov_len -= (size_t)skip;
    ssize_t r = preadv(fd, iov + first, niov - first, offset + done);
    iov[first].iov_base = (char *)iov[first].iov_base - skip;
    iov[first].iov_len += (size_t)skip;
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) return -EIO;
    done += r;
  }
  return 0;
}

#define FM_MAX_COMP 16

// The bytes [*a, *a + *n) of the expert that piece [p0, p1) of expert e holds of component c,
// and where they go (*dst); 0 if the piece holds none of c.
static int segment(const fm_job *j, int c, int64_t e, int64_t p0, int64_t p1, int64_t *a, int64_t *n,
                   uint64_t *dst) {
  int64_t lo = p0 > j->comp_offset[c] ? p0 : j->comp_offset[c];
  int64_t cend = j->comp_offset[c] + j->comp_nbytes[c];
  int64_t hi = p1 < cend ? p1 : cend;
  if (lo >= hi) return 0;
  *a = lo;
  *n = hi - lo;
  *dst = j->comp_base[c] + (uint64_t)(j->row[e] * j->comp_nbytes[c] + (lo - j->comp_offset[c]));
  return 1;
}

// Take the job's next piece: expert e, bytes [p0, p1) of it. 0 when none is left or a read failed.
static int next_piece(fm_job *j, int64_t *e, int64_t *p0, int64_t *p1) {
  int64_t i = atomic_fetch_add(&j->next, 1);
  if (i >= j->n_pieces || atomic_load(&j->error)) return 0;
  *e = i / j->pieces_per_expert;
  *p0 = (i % j->pieces_per_expert) * j->piece;
  *p1 = *p0 + j->piece < j->expert_bytes ? *p0 + j->piece : j->expert_bytes;
  return 1;
}

// Wake fm_upload_wait_expert callers: an expert landed, a read failed or the job ended.
static void announce(fm_uploader *u) {
  pthread_mutex_lock(&u->mu);
  pthread_cond_broadcast(&u->progress);
  pthread_mutex_unlock(&u->mu);
}

// Direct mode (no copy function): each piece is read straight into its components' rows.
static void work_direct(fm_uploader *u) {
  fm_job *j = &u->job;
  int64_t e, p0, p1;
  while (next_piece(j, &e, &p0, &p1)) {
    struct iovec iov[FM_MAX_COMP];
    int niov = 0;
    for (int c = 0; c < j->ncomp; c++) {
      int64_t a, n;
      uint64_t dst;
      if (!segment(j, c, e, p0, p1, &a, &n, &dst)) continue;
      iov[niov].iov_base = (void *)(uintptr_t)dst;
      iov[niov++].iov_len = (size_t)n;
    }
    int r = read_iov(j->fd, iov, niov, j->file_offset[e] + p0, p1 - p0, j->probe);
    if (r < 0) {
      atomic_store(&j->error, r);
      announce(u);
      break;
    }
    if (r == 1) atomic_fetch_add(&j->hit_bytes, p1 - p0);
    if (j->landed && atomic_fetch_add(&j->landed[e], 1) + 1 == j->pieces_per_expert) announce(u);
  }
}

static void work_async(fm_uploader *u);

static void work(fm_uploader *u, int w) {
  if (u->job.async) {
    work_async(u);
    return;
  }
  if (!u->memcpy_async) {
    work_direct(u);
    return;
  }
  fm_job *j = &u->job;
  void *stream = u->streams[w];
  int k = 0, pending = 0;
  int64_t e, p0, p1;
  while (next_piece(j, &e, &p0, &p1)) {
    char *buf = (char *)u->pinned[2 * w + k];
    int r = read_piece(j->fd, buf, j->file_offset[e] + p0, p1 - p0, j->probe);
    if (r < 0) {
      atomic_store(&j->error, r);
      break;
    }
    if (r == 1) atomic_fetch_add(&j->hit_bytes, p1 - p0);
    // the copy out of the other buffer (previous piece) must be done before that buffer is read into
    if (pending && u->stream_sync(stream) != 0) {
      atomic_store(&j->error, -1000);
      break;
    }
    for (int c = 0; c < j->ncomp; c++) {
      int64_t a, n;
      uint64_t dst;
      if (!segment(j, c, e, p0, p1, &a, &n, &dst)) continue;
      if (u->memcpy_async((void *)dst, buf + (a - p0), (size_t)n, H2D, stream) != 0) {
        atomic_store(&j->error, -1001);
        break;
      }
    }
    pending = 1;
    k ^= 1;
  }
  if (pending && u->stream_sync(stream) != 0) atomic_store(&j->error, -1000);
}

#define FM_AIO_MAX 256

#ifdef FM_HAVE_AIO
typedef struct {
  struct iocb cb;
  struct iovec iov[FM_MAX_COMP];
  int niov;
  int64_t e, nbytes, done;  // expert, the piece's bytes, bytes already read (short reads)
} fm_aio_slot;

// (Re)arm a slot's request for what is left of its piece: after a short read, the iovecs
// (and bytes) already read are dropped first.
static void arm(fm_aio_slot *s, int fd, int64_t offset) {
  int first = 0;
  int64_t skip = s->done;
  while (first < s->niov && skip >= (int64_t)s->iov[first].iov_len) skip -= (int64_t)s->iov[first++].iov_len;
  memmove(s->iov, s->iov + first, sizeof(struct iovec) * (size_t)(s->niov - first));
  s->niov -= first;
  if (s->niov > 0) {
    s->iov[0].iov_base = (char *)s->iov[0].iov_base + skip;
    s->iov[0].iov_len -= (size_t)skip;
  }
  memset(&s->cb, 0, sizeof s->cb);
  s->cb.aio_lio_opcode = IOCB_CMD_PREADV;
  s->cb.aio_fildes = (uint32_t)fd;
  s->cb.aio_buf = (uint64_t)(uintptr_t)s->iov;
  s->cb.aio_nbytes = (uint64_t)s->niov;
  s->cb.aio_offset = offset + s->done;
  s->cb.aio_data = (uint64_t)(uintptr_t)s;
  s->nbytes -= s->done;
  s->done = 0;
}

// Asynchronous direct job, on worker 0: pieces in expert order, at most the context's depth in
// flight. An expert is landed once every piece of it has completed with all its bytes; a failed
// request, or a short one that cannot go on (the file ends: truncated), is the job's error, after
// which nothing more is submitted and the requests in flight are drained before the job ends
// (their buffers are written by the device until then).
static void work_async(fm_uploader *u) {
  fm_job *j = &u->job;
  aio_context_t ctx = (aio_context_t)u->aio_ctx;
  int depth = u->aio_depth;
  fm_aio_slot slots[FM_AIO_MAX];
  fm_aio_slot *free_slots[FM_AIO_MAX];
  struct iocb *queue[FM_AIO_MAX];
  struct io_event ev[FM_AIO_MAX];
  int nfree = depth, nqueued = 0, inflight = 0, more = 1;
  for (int i = 0; i < depth; i++) free_slots[i] = &slots[i];
  for (;;) {
    // fill: the next pieces into free slots
    while (more && nfree > 0 && !atomic_load(&j->error)) {
      int64_t e, p0, p1;
      if (!next_piece(j, &e, &p0, &p1)) {
        more = 0;
        break;
      }
      fm_aio_slot *s = free_slots[--nfree];
      s->niov = 0;
      for (int c = 0; c < j->ncomp; c++) {
        int64_t a, n;
        uint64_t dst;
        if (!segment(j, c, e, p0, p1, &a, &n, &dst)) continue;
        s->iov[s->niov].iov_base = (void *)(uintptr_t)dst;
        s->iov[s->niov++].iov_len = (size_t)n;
      }
      s->e = e;
      s->nbytes = p1 - p0;
      s->done = 0;
      arm(s, j->fd, j->file_offset[e] + p0);
      queue[nqueued++] = &s->cb;
    }
    if (atomic_load(&j->error)) nqueued = 0;  // (their slots are not needed again)
    // submit what is queued (all of it, or what the kernel takes now)
    while (nqueued > 0) {
      long r = syscall(SYS_io_submit, ctx, (long)nqueued, queue);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && errno == EAGAIN && inflight > 0) break;  // reap first, then retry
      if (r < 0) {
        atomic_store(&j->error, errno == EAGAIN ? -EAGAIN : -errno);
        announce(u);
        nqueued = 0;
        break;
      }
      inflight += (int)r;
      nqueued -= (int)r;
      memmove(queue, queue + r, sizeof(queue[0]) * (size_t)nqueued);
    }
    if (inflight == 0 && nqueued == 0 && (!more || atomic_load(&j->error))) break;
    if (inflight == 0) continue;
    long r = syscall(SYS_io_getevents, ctx, 1L, (long)depth, ev, NULL);
    if (r < 0) {
      if (errno == EINTR) continue;
      // cannot happen with a valid context; the requests in flight cannot be waited for either
      atomic_store(&j->error, -errno);
      announce(u);
      break;
    }
    for (long i = 0; i < r; i++) {
      fm_aio_slot *s = (fm_aio_slot *)(uintptr_t)ev[i].data;
      int64_t res = (int64_t)ev[i].res;
      inflight--;
      if (res < 0) {
        atomic_store(&j->error, (int)res);
        announce(u);
      } else if (res < s->nbytes) {
        // short: the file ends early (truncated while in use), unless the rest can be asked
        // for on a 4 KiB boundary (O_DIRECT) and the read made progress
        if (res == 0 || res % 4096 || atomic_load(&j->error)) {
          if (!atomic_load(&j->error)) atomic_store(&j->error, -EIO);
          announce(u);
        } else {
          s->done = res;
          arm(s, j->fd, (int64_t)s->cb.aio_offset);  // the rest: from aio_offset + res
          queue[nqueued++] = &s->cb;                 // (at most `depth` slots: room in the queue)
          continue;
        }
      } else if (j->landed && atomic_fetch_add(&j->landed[s->e], 1) + 1 == j->pieces_per_expert) {
        announce(u);
      }
      free_slots[nfree++] = s;
    }
  }
}
#else
static void work_async(fm_uploader *u) {
  atomic_store(&u->job.error, -ENOSYS);
  announce(u);
}
#endif

static void *worker_main(void *p) {
  fm_worker_arg *arg = (fm_worker_arg *)p;
  fm_uploader *u = arg->u;
  int w = arg->index;
  free(arg);
  int64_t seen = 0;
  for (;;) {
    pthread_mutex_lock(&u->mu);
    // (an asynchronous job is worker 0's alone: the others sleep through it)
    while (!u->stop && (u->generation == seen || (w != 0 && u->job.async)))
      pthread_cond_wait(w == 0 ? &u->start0 : &u->start, &u->mu);
    if (u->stop) {
      pthread_mutex_unlock(&u->mu);
      return NULL;
    }
    seen = u->generation;
    pthread_mutex_unlock(&u->mu);
    work(u, w);
    pthread_mutex_lock(&u->mu);
    if (--u->running == 0) {
      pthread_cond_signal(&u->done);
      pthread_cond_broadcast(&u->progress);
    }
    pthread_mutex_unlock(&u->mu);
  }
}

fm_uploader *fm_uploader_new(int nthreads, int64_t piece_cap, void **pinned, void **streams,
                             fm_memcpy_async_fn memcpy_async, fm_sync_fn stream_sync) {
  fm_uploader *u = calloc(1, sizeof(fm_uploader));
  if (!u) return NULL;
  u->nthreads = nthreads;
  u->piece_cap = piece_cap;
  u->pinned = calloc(2 * nthreads, sizeof(void *));
  u->streams = calloc(nthreads, sizeof(void *));
  u->threads = calloc(nthreads, sizeof(pthread_t));
  if (pinned) memcpy(u->pinned, pinned, sizeof(void *) * 2 * nthreads);
  if (streams) memcpy(u->streams, streams, sizeof(void *) * nthreads);
  u->memcpy_async = memcpy_async;
  u->stream_sync = stream_sync;
  pthread_mutex_init(&u->mu, NULL);
  pthread_cond_init(&u->start, NULL);
  pthread_cond_init(&u->done, NULL);
  pthread_cond_init(&u->progress, NULL);
  pthread_cond_init(&u->start0, NULL);
  for (int i = 0; i < nthreads; i++) {
    fm_worker_arg *arg = malloc(sizeof(fm_worker_arg));
    arg->u = u;
    arg->index = i;
    pthread_create(&u->threads[i], NULL, worker_main, arg);
  }
  return u;
}

// Upload n experts of one layer file: expert i's bytes at file_offset[i] go to row row[i] of
// every component c (base comp_base[c], comp_nbytes[c] per row, at comp_offset[c] in the expert).
// Pieces of at most `piece` bytes (<= the pinned buffers' size). Returns the bytes the page cache
// served, or a negative error: -errno of a failed read, -1000/-1001 a failed sync/copy.
int64_t fm_upload_run(fm_uploader *u, int fd, const int64_t *file_offset, const int64_t *row, int64_t n,
                      int64_t expert_bytes, int ncomp, const int64_t *comp_offset, const int64_t *comp_nbytes,
                      const uint64_t *comp_base, int64_t piece, int probe) {
  int64_t r = fm_upload_start(u, fd, file_offset, row, n, expert_bytes, ncomp, comp_offset, comp_nbytes,
                              comp_base, piece, probe, NULL);
  return r < 0 ? r : fm_upload_finish(u);
}

// The same job, returned from at once (0, or a negative error before anything started).
// `landed` (direct mode only; NULL: not counted): n zeroed counters, one per expert.
// Every started job must be ended by fm_upload_finish before the next one starts, and the
// arrays passed here must stay alive until then.
static int64_t start_job(fm_uploader *u, int fd, const int64_t *file_offset, const int64_t *row, int64_t n,
                         int64_t expert_bytes, int ncomp, const int64_t *comp_offset, const int64_t *comp_nbytes,
                         const uint64_t *comp_base, int64_t piece, int probe, int64_t *landed, int async);

int64_t fm_upload_start(fm_uploader *u, int fd, const int64_t *file_offset, const int64_t *row, int64_t n,
                        int64_t expert_bytes, int ncomp, const int64_t *comp_offset, const int64_t *comp_nbytes,
                        const uint64_t *comp_base, int64_t piece, int probe, int64_t *landed) {
  return start_job(u, fd, file_offset, row, n, expert_bytes, ncomp, comp_offset, comp_nbytes, comp_base, piece,
                   probe, landed, 0);
}

// The same job (direct mode, no probe) read by one thread through the uploader's AIO context
// (fm_uploader_async), at most its depth of pieces in flight: for a descriptor opened with
// O_DIRECT, whose reads the kernel then carries out asynchronously. -EINVAL without a context.
int64_t fm_upload_start_async(fm_uploader *u, int fd, const int64_t *file_offset, const int64_t *row, int64_t n,
                              int64_t expert_bytes, int ncomp, const int64_t *comp_offset,
                              const int64_t *comp_nbytes, const uint64_t *comp_base, int64_t piece,
                              int64_t *landed) {
  if (!u->aio_ctx || u->memcpy_async || piece <= 0) return -EINVAL;
  return start_job(u, fd, file_offset, row, n, expert_bytes, ncomp, comp_offset, comp_nbytes, comp_base, piece, 0,
                   landed, 1);
}

static int64_t start_job(fm_uploader *u, int fd, const int64_t *file_offset, const int64_t *row, int64_t n,
                         int64_t expert_bytes, int ncomp, const int64_t *comp_offset, const int64_t *comp_nbytes,
                         const uint64_t *comp_base, int64_t piece, int probe, int64_t *landed, int async) {
  if (ncomp > FM_MAX_COMP) return -EINVAL;
  if (landed && u->memcpy_async) return -EINVAL;
  if (piece <= 0 || (u->memcpy_async && piece > u->piece_cap)) piece = u->piece_cap;
  fm_job *j = &u->job;
  j->fd = fd;
  j->file_offset = file_offset;
  j->row = row;
  j->n_experts = n > 0 ? n : 0;
  j->expert_bytes = expert_bytes;
  j->ncomp = ncomp;
  j->comp_offset = comp_offset;
  j->comp_nbytes = comp_nbytes;
  j->comp_base = comp_base;
  j->piece = piece;
  j->pieces_per_expert = (expert_bytes + piece - 1) / piece;
  j->n_pieces = j->n_experts * j->pieces_per_expert;
  j->probe = probe;
  j->landed = (atomic_llong *)landed;
  atomic_store(&j->next, 0);
  atomic_store(&j->hit_bytes, 0);
  atomic_store(&j->error, 0);
  if (j->n_experts == 0) return 0;
  pthread_mutex_lock(&u->mu);
  j->async = async;  // (under the lock: the other workers test it there)
  u->running = async ? 1 : u->nthreads;
  u->generation++;
  pthread_cond_signal(&u->start0);
  if (!async) pthread_cond_broadcast(&u->start);
  pthread_mutex_unlock(&u->mu);
  return 0;
}

// Block until expert i of the running job has landed: 0, or the job's negative error.
int64_t fm_upload_wait_expert(fm_uploader *u, int64_t i) {
  fm_job *j = &u->job;
  if (!j->landed || i < 0 || i >= j->n_experts) return -EINVAL;
  pthread_mutex_lock(&u->mu);
  while (atomic_load(&j->landed[i]) < j->pieces_per_expert && !atomic_load(&j->error) && u->running > 0)
    pthread_cond_wait(&u->progress, &u->mu);
  pthread_mutex_unlock(&u->mu);
  int err = atomic_load(&j->error);
  if (err) return err;
  return atomic_load(&j->landed[i]) >= j->pieces_per_expert ? 0 : -EIO;
}

// Wait for the running job's end: the bytes the page cache served, or a negative error:
// -errno of a failed read, -1000/-1001 a failed sync/copy.
int64_t fm_upload_finish(fm_uploader *u) {
  fm_job *j = &u->job;
  pthread_mutex_lock(&u->mu);
  while (u->running > 0) pthread_cond_wait(&u->done, &u->mu);
  pthread_mutex_unlock(&u->mu);
  int err = atomic_load(&j->error);
  return err ? err : atomic_load(&j->hit_bytes);
}

void fm_uploader_free(fm_uploader *u) {
  if (!u) return;
  pthread_mutex_lock(&u->mu);
  u->stop = 1;
  pthread_cond_broadcast(&u->start);
  pthread_cond_broadcast(&u->start0);
  pthread_mutex_unlock(&u->mu);
  for (int i = 0; i < u->nthreads; i++) pthread_join(u->threads[i], NULL);
#ifdef FM_HAVE_AIO
  if (u->aio_ctx) syscall(SYS_io_destroy, (aio_context_t)u->aio_ctx);
#endif
  pthread_mutex_destroy(&u->mu);
  pthread_cond_destroy(&u->start);
  pthread_cond_destroy(&u->done);
  pthread_cond_destroy(&u->progress);
  pthread_cond_destroy(&u->start0);
  free(u->pinned);
  free(u->streams);
  free(u->threads);
  free(u);
}

// Give the uploader an AIO context of `depth` requests (1-256) for fm_upload_start_async:
// 0, or -errno where the kernel has none (ENOSYS), refuses (EAGAIN: fs.aio-max-nr), or a
// direct-mode uploader was not asked for (EINVAL). Made once: io_destroy waits for an RCU
// grace period (~30 ms here), far too slow per job.
int64_t fm_uploader_async(fm_uploader *u, int depth) {
  if (u->memcpy_async || depth < 1 || depth > FM_AIO_MAX) return -EINVAL;
  if (u->aio_ctx) return u->aio_depth == depth ? 0 : -EBUSY;
#ifdef FM_HAVE_AIO
  aio_context_t ctx = 0;
  if (syscall(SYS_io_setup, (unsigned)depth, &ctx) < 0) return -errno;
  u->aio_ctx = (unsigned long)ctx;
  u->aio_depth = depth;
  return 0;
#else
  return -ENOSYS;
#endif
}

// Host-memory stand-ins for cudaMemcpyAsync / cudaStreamSynchronize (tests; unified memory).
int fm_host_memcpy_async(void *dst, const void *src, size_t n, int kind, void *stream) {
  (void)kind;
  (void)stream;
  memmove(dst, src, n);
  return 0;
}

int fm_host_stream_sync(void *stream) {
  (void)stream;
  return 0;
}
