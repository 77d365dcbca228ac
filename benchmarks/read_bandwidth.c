/* Streaming read bandwidth of this machine, the bound on batch-1 decode (each token reads every weight once:
 * ~92 MiB for the default model at int4 with its 8-bit head). Best of 15 passes over a buffer, summed with AVX2
 * loads on T OpenMP threads (static split, as cairn's and llama.cpp's decode kernels split their rows).
 *
 *   gcc -O3 -march=native -fopenmp benchmarks/read_bandwidth.c -o /tmp/read_bandwidth
 *   /tmp/read_bandwidth [MiB=1024] [threads=2]      (92 MiB: the decode working set; 1024 MiB: beyond any cache)
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t n=(size_t)(argc>1?atol(argv[1]):1024)<<20; int th=argc>2?atoi(argv[2]):2;
  char*b=aligned_alloc(64,n); memset(b,1,n);
  double best=0; __m256i tot=_mm256_setzero_si256();
  for(int r=0;r<15;r++){
    double t0=now();
    #pragma omp parallel num_threads(th)
    { __m256i a0=_mm256_setzero_si256(),a1=a0,a2=a0,a3=a0;
      #pragma omp for schedule(static)
      for(size_t i=0;i<n;i+=128){ const __m256i*p=(const __m256i*)(b+i);
        a0=_mm256_add_epi64(a0,_mm256_load_si256(p));a1=_mm256_add_epi64(a1,_mm256_load_si256(p+1));
        a2=_mm256_add_epi64(a2,_mm256_load_si256(p+2));a3=_mm256_add_epi64(a3,_mm256_load_si256(p+3));}
      #pragma omp critical
      tot=_mm256_add_epi64(tot,_mm256_add_epi64(_mm256_add_epi64(a0,a1),_mm256_add_epi64(a2,a3)));}
    double gbs=n/(now()-t0)/1e9; if(gbs>best)best=gbs;
  }
  printf("buffer %zu MiB, %d threads: best read %.1f GB/s (%lld)\n",n>>20,th,best,(long long)_mm256_extract_epi64(tot,0));
}
