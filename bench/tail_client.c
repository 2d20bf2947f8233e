// A closed-loop HTTP/1.1 load client like wrk (N connections over T threads, each sending its
// next request when the last answer is in), which writes every request's timestamps instead
// of percentiles: one line per request, "thread connection sent first_byte last_byte" in
// CLOCK_MONOTONIC ns (Python's time.monotonic_ns), so a tail can be matched with what the
// server did meanwhile. bench/tail.py compiles and runs it.
// usage: tail_client PORT PATH CONNECTIONS THREADS SECONDS OUTFILE [HEADER...]
// A PATH with one "%d" asks for many keys: KEYS=N, each request a random id in [0, N); FILL=N,
// the ids 0 .. N-1 once each, in order over all connections (SECONDS is then a limit).
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <time.h>
#include <errno.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <sched.h>

static char *req; static int reqlen; static int port; static double dur; static int nthreads, nconn;
static int pin = -1;
static char *path, *extra; static long keys, fill; static long next_id; // the "%d" in PATH
typedef struct { int conn; long long send, first, done; } rec_t;
typedef struct { int fd, id; char buf[1<<20]; int got; long long send, first; } conn_t;
typedef struct { int tid; rec_t *recs; long n, cap; unsigned seed; char out[8192]; } thr_t;

static long long now(void){ struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec*1000000000LL+t.tv_nsec; }

// The next request's bytes: the fixed one, or PATH with the next id (-1: FILL is done).
static int request(thr_t *t, const char **buf){
  if(!keys && !fill){ *buf=req; return reqlen; }
  long id;
  if(fill){ id=__atomic_fetch_add(&next_id,1,__ATOMIC_RELAXED); if(id>=fill) return -1; }
  else id=rand_r(&t->seed)%keys;
  int n=snprintf(t->out,sizeof t->out,"GET ");
  n+=snprintf(t->out+n,sizeof t->out-n,path,(int)id);
  n+=snprintf(t->out+n,sizeof t->out-n," HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n",port,extra);
  *buf=t->out; return n; }

static void sendreq(conn_t *c, const char *buf, int len){
  c->send=now(); c->first=0; if(write(c->fd,buf,len)!=len){perror("write");exit(1);} }

static int opencon(void){
  int fd=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in a={0}; a.sin_family=AF_INET; a.sin_port=htons(port);
  a.sin_addr.s_addr=htonl(0x7f000001); if(connect(fd,(void*)&a,sizeof a)<0){perror("connect");exit(1);} int one=1;
  setsockopt(fd,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one); fcntl(fd,F_SETFL,O_NONBLOCK); return fd; }

static long complete(conn_t *c){ // returns total length if complete else -1
  c->buf[c->got]=0; char *e=strstr(c->buf,"\r\n\r\n"); if(!e) return -1; long hl=e+4-c->buf;
  long cl=0; char *p=c->buf; int chunked=0;
  while(p<e){ char *nl=strstr(p,"\r\n"); if(!strncasecmp(p,"content-length:",15)) cl=atol(p+15);
    if(!strncasecmp(p,"transfer-encoding:",18)) chunked=1;
    p=nl+2;
  }
  if(chunked){ char *z=memmem(e+4,c->got-hl,"\r\n0\r\n\r\n",7); if(!z) { if(c->got-hl>=5 && !memcmp(e+4,"0\r\n\r\n",5)) return hl+5; return -1;} return z+7-c->buf; }
  if(c->got>=hl+cl) return hl+cl;
  return -1;
}

static void *run(void *arg){
  thr_t *t=arg; if(pin>=0){cpu_set_t s;CPU_ZERO(&s);CPU_SET(pin,&s);sched_setaffinity(0,sizeof s,&s);}
  int per=nconn/nthreads; int ep=epoll_create1(0); conn_t *cs=calloc(per,sizeof(conn_t));
  long long end=now()+(long long)(dur*1e9);
  int active=per; const char *buf; int len;
  for(int i=0;i<per;i++){ cs[i].fd=opencon(); cs[i].id=t->tid*per+i; struct epoll_event ev={.events=EPOLLIN,.data.ptr=&cs[i]}; epoll_ctl(ep,EPOLL_CTL_ADD,cs[i].fd,&ev);
    if((len=request(t,&buf))<0){ close(cs[i].fd); active--; continue; } sendreq(&cs[i],buf,len); }
  struct epoll_event evs[256];
  while(active>0){ int n=epoll_wait(ep,evs,256,100); long long tn=now();
    for(int k=0;k<n;k++){ conn_t *c=evs[k].data.ptr; for(;;){ ssize_t r=read(c->fd,c->buf+c->got,sizeof(c->buf)-1-c->got); if(r<=0) break; if(!c->first) c->first=tn; c->got+=r; }
      long L=complete(c); if(L<0) continue; long long td=now();
      if(t->n==t->cap){t->cap=t->cap?t->cap*2:65536; t->recs=realloc(t->recs,t->cap*sizeof(rec_t));}
      t->recs[t->n++]=(rec_t){c->id,c->send,c->first,td};
      memmove(c->buf,c->buf+L,c->got-L); c->got-=L;
      if(td>=end || (len=request(t,&buf))<0){ epoll_ctl(ep,EPOLL_CTL_DEL,c->fd,NULL); close(c->fd); active--; continue; }
      sendreq(c,buf,len); }
  }
  return NULL; }

int main(int argc,char**argv){
  port=atoi(argv[1]); path=argv[2]; nconn=atoi(argv[3]); nthreads=atoi(argv[4]); dur=atof(argv[5]); char *out=argv[6];
  if(getenv("PIN")) pin=atoi(getenv("PIN")); // PIN=k: every thread on core k
  req=malloc(8192); reqlen=sprintf(req,"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n",path,port);
  for(int i=7;i<argc;i++) reqlen+=sprintf(req+reqlen,"%s\r\n",argv[i]);
  reqlen+=sprintf(req+reqlen,"\r\n");
  if(getenv("KEYS")) keys=atol(getenv("KEYS"));
  if(getenv("FILL")) fill=atol(getenv("FILL"));
  extra=malloc(8192); extra[0]=0; for(int i=7,n=0;i<argc;i++) n+=snprintf(extra+n,8192-n,"%s\r\n",argv[i]);
  pthread_t th[64]; thr_t ts[64]; memset(ts,0,sizeof ts);
  for(int i=0;i<nthreads;i++){ts[i].tid=i; ts[i].seed=0x9e3779b9u*(i+1); pthread_create(&th[i],NULL,run,&ts[i]);}
  FILE *f=fopen(out,"w"); long tot=0;
  for(int i=0;i<nthreads;i++){ pthread_join(th[i],NULL); for(long j=0;j<ts[i].n;j++) fprintf(f,"%d %d %lld %lld %lld\n",i,ts[i].recs[j].conn,ts[i].recs[j].send,ts[i].recs[j].first,ts[i].recs[j].done); tot+=ts[i].n;}
  fclose(f); fprintf(stderr,"%ld requests, %.0f req/s\n",tot,tot/dur); return 0; }
