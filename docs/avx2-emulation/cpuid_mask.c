// SIGILL handler: the patched library's cpuid instructions were replaced by ud2 (0f 0b). Run the real
// cpuid and hide AVX-512 (all of it), AVX-VNNI (and its INT8 form) and AMX, as an AVX2-only CPU would report.
// With CPUID_MASK_SSE=1 in the environment, AVX, AVX2 and FMA go too: ONNX Runtime's SSE kernels, whose
// uint8 x int8 products are exact (tests/test_signed_weights.py).
#define _GNU_SOURCE
#include <signal.h>
#include <string.h>
#include <ucontext.h>
#include <cpuid.h>
#include <stdint.h>
#include <stdlib.h>
static int sse_only;
static void handler(int sig, siginfo_t *si, void *ctx) {
  ucontext_t *uc = (ucontext_t *)ctx;
  greg_t *r = uc->uc_mcontext.gregs;
  unsigned char *ip = (unsigned char *)r[REG_RIP];
  if (!(ip[0] == 0x0f && ip[1] == 0x0b)) { signal(SIGILL, SIG_DFL); return; }
  unsigned a, b, c, d, leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX];
  __cpuid_count(leaf, sub, a, b, c, d);
  if (leaf == 1 && sse_only) c &= ~((1u<<12)|(1u<<28)); // fma avx
  if (leaf == 7 && sub == 0) {
    if (sse_only) b &= ~(1u<<5); // avx2
    b &= ~((1u<<16)|(1u<<17)|(1u<<21)|(1u<<26)|(1u<<27)|(1u<<28)|(1u<<30)|(1u<<31)); // avx512 f dq ifma pf er cd bw vl
    c &= ~((1u<<1)|(1u<<6)|(1u<<11)|(1u<<12)|(1u<<14)); // avx512 vbmi vbmi2 vnni bitalg vpopcntdq
    d &= ~((1u<<2)|(1u<<3)|(1u<<8)|(1u<<23)|(1u<<22)|(1u<<24)|(1u<<25)); // 4vnniw 4fmaps vp2intersect fp16 amx-bf16 amx-tile amx-int8
  }
  if (leaf == 7 && sub == 1) { a &= ~((1u<<4)|(1u<<5)); d &= ~((1u<<4)|(1u<<5)); } // avx-vnni, avx512_bf16; avx-vnni-int8, avx-ne-convert
  r[REG_RAX] = a; r[REG_RBX] = b; r[REG_RCX] = c; r[REG_RDX] = d;
  r[REG_RIP] += 2;
}
__attribute__((constructor)) static void init(void) {
  struct sigaction sa; memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = handler; sa.sa_flags = SA_SIGINFO;
  sigaction(SIGILL, &sa, 0);
  const char *sse = getenv("CPUID_MASK_SSE");
  sse_only = sse && sse[0] == '1';
}
