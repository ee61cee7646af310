Disassembly of section .text:

<kiln_v1_rms_norm_norm>:
	ldr	x11, [x0, #24]
	ldr	x9, [x0]
	ldr	x8, [x0, #8]
	ldr	x3, [x0, #32]
	mul	x0, x3, x1
	cbz	x2, <kiln_v1_rms_norm_norm+0x2b8>
	udiv	x10, x0, x2
	add	x0, x1, #0x1
	mul	x0, x3, x0
	cbz	x2, <kiln_v1_rms_norm_norm+0x2bc>
	udiv	x3, x0, x2
	cmp	x10, x3
	b.lt	<kiln_v1_rms_norm_norm+0x38>  // b.tstop
	ret
	mov	x2, #0x0                   	// #0
	movi	v23.16b, #0x0
	cmp	x2, #0x100
	b.lt	<kiln_v1_rms_norm_norm+0x29c>  // b.tstop
	mov	x4, #0x0                   	// #0
	cmp	x4, #0x2
	b.lt	<kiln_v1_rms_norm_norm+0x5c>  // b.tstop
	add	x10, x10, #0x1
	b	<kiln_v1_rms_norm_norm+0x2c>
	ldr	x0, [x11]
	add	x0, x0, x10, lsl #8
	lsl	x7, x4, #7
	add	x5, x0, x4, lsl #7
	ldr	q0, [x0, x7]
	fmov	s1, #1.000000000000000000e+00
	mov	s2, v23.s[1]
	fadd	s2, s23, s2
	mov	s3, v23.s[2]
	mov	s4, v23.s[3]
	fadd	s3, s3, s4
	fadd	s2, s2, s3
	mov	w0, #0x3c800000            	// #1015021568
	fmov	s3, w0
	fmul	s2, s2, s3
	mov	w0, #0xc5ac                	// #50604
	movk	w0, #0x3727, lsl #16
	fmov	s3, w0
	fadd	s2, s2, s3
	fsqrt	s2, s2
	fdiv	s1, s1, s2
	dup	v7.4s, v1.s[0]
	fmul	v0.4s, v0.4s, v7.4s
	add	x6, x8, x4, lsl #7
	ldr	q1, [x8, x7]
	fmul	v0.4s, v0.4s, v1.4s
	fabs	v2.4s, v0.4s
	ldr	q1, [x5, #16]
	fmul	v1.4s, v1.4s, v7.4s
	ldr	q3, [x6, #16]
	fmul	v1.4s, v1.4s, v3.4s
	fabs	v3.4s, v1.4s
	fmax	v3.4s, v2.4s, v3.4s
	ldr	q2, [x5, #32]
	fmul	v2.4s, v2.4s, v7.4s
	ldr	q4, [x6, #32]
	fmul	v2.4s, v2.4s, v4.4s
	fabs	v4.4s, v2.4s
	fmax	v4.4s, v3.4s, v4.4s
	ldr	q3, [x5, #48]
	fmul	v3.4s, v3.4s, v7.4s
	ldr	q5, [x6, #48]
	fmul	v3.4s, v3.4s, v5.4s
	fabs	v5.4s, v3.4s
	fmax	v5.4s, v4.4s, v5.4s
	ldr	q4, [x5, #64]
	fmul	v4.4s, v4.4s, v7.4s
	ldr	q6, [x6, #64]
	fmul	v4.4s, v4.4s, v6.4s
	fabs	v6.4s, v4.4s
	fmax	v6.4s, v5.4s, v6.4s
	ldr	q5, [x5, #80]
	fmul	v5.4s, v5.4s, v7.4s
	ldr	q16, [x6, #80]
	fmul	v5.4s, v5.4s, v16.4s
	fabs	v16.4s, v5.4s
	fmax	v16.4s, v6.4s, v16.4s
	ldr	q6, [x5, #96]
	fmul	v6.4s, v6.4s, v7.4s
	ldr	q17, [x6, #96]
	fmul	v6.4s, v6.4s, v17.4s
	fabs	v17.4s, v6.4s
	fmax	v16.4s, v16.4s, v17.4s
	ldr	q17, [x5, #112]
	fmul	v7.4s, v17.4s, v7.4s
	ldr	q17, [x6, #112]
	fmul	v7.4s, v7.4s, v17.4s
	fabs	v17.4s, v7.4s
	fmax	v16.4s, v16.4s, v17.4s
	mov	s17, v16.s[1]
	fmax	s17, s16, s17
	mov	s18, v16.s[2]
	mov	s16, v16.s[3]
	fmax	s16, s18, s16
	fmax	s17, s17, s16
	mov	w0, #0xfe00                	// #65024
	movk	w0, #0x46ff, lsl #16
	fmov	s18, w0
	fdiv	s16, s17, s18
	mov	x0, #0x90                  	// #144
	madd	x5, x10, x0, x9
	mov	x0, #0x48                  	// #72
	mul	x6, x4, x0
	madd	x7, x4, x0, x5
	str	s16, [x5, x6]
	movi	v19.2s, #0x0
	fdiv	s18, s18, s17
	fcmp	s17, s19
	fcsel	s17, s18, s19, gt
	dup	v17.4s, v17.s[0]
	fmul	v0.4s, v0.4s, v17.4s
	frintn	v0.4s, v0.4s
	fcvtzs	v0.4s, v0.4s
	fmul	v1.4s, v1.4s, v17.4s
	frintn	v1.4s, v1.4s
	fcvtzs	v1.4s, v1.4s
	add	v18.4s, v0.4s, v1.4s
	fmul	v2.4s, v2.4s, v17.4s
	frintn	v2.4s, v2.4s
	fcvtzs	v2.4s, v2.4s
	add	v18.4s, v18.4s, v2.4s
	fmul	v3.4s, v3.4s, v17.4s
	frintn	v3.4s, v3.4s
	fcvtzs	v3.4s, v3.4s
	add	v18.4s, v18.4s, v3.4s
	fmul	v4.4s, v4.4s, v17.4s
	frintn	v4.4s, v4.4s
	fcvtzs	v4.4s, v4.4s
	add	v18.4s, v18.4s, v4.4s
	fmul	v5.4s, v5.4s, v17.4s
	frintn	v5.4s, v5.4s
	fcvtzs	v5.4s, v5.4s
	add	v18.4s, v18.4s, v5.4s
	fmul	v6.4s, v6.4s, v17.4s
	frintn	v6.4s, v6.4s
	fcvtzs	v6.4s, v6.4s
	add	v18.4s, v18.4s, v6.4s
	fmul	v7.4s, v7.4s, v17.4s
	frintn	v7.4s, v7.4s
	fcvtzs	v7.4s, v7.4s
	add	v17.4s, v18.4s, v7.4s
	addv	s17, v17.4s
	mov	w0, v17.s[0]
	scvtf	s17, w0
	fmul	s16, s17, s16
	str	s16, [x7, #4]
	sqxtn	v0.4h, v0.4s
	sqxtn2	v0.8h, v1.4s
	add	x0, x5, #0x8
	str	q0, [x0, x6]
	sqxtn	v0.4h, v2.4s
	sqxtn2	v0.8h, v3.4s
	add	x0, x5, #0x18
	str	q0, [x0, x6]
	sqxtn	v0.4h, v4.4s
	sqxtn2	v0.8h, v5.4s
	add	x0, x5, #0x28
	str	q0, [x0, x6]
	sqxtn	v0.4h, v6.4s
	sqxtn2	v0.8h, v7.4s
	add	x0, x5, #0x38
	str	q0, [x0, x6]
	add	x4, x4, #0x1
	b	<kiln_v1_rms_norm_norm+0x4c>
	add	x1, x2, #0x10
	ldr	x0, [x11]
	add	x0, x0, x10, lsl #8
	ldr	q0, [x0, x2]
	fmla	v23.4s, v0.4s, v0.4s
	mov	x2, x1
	b	<kiln_v1_rms_norm_norm+0x40>
	udf	#49439
	udf	#49439

<kiln_v2_matmul_q4>:
	ldr	x15, [x0]
	ldr	x12, [x0, #8]
	ldr	x11, [x0, #32]
	lsl	x0, x1, #4
	cbz	x2, <kiln_v2_matmul_q4+0x34c>
	udiv	x10, x0, x2
	add	x0, x1, #0x1
	lsl	x0, x0, #4
	cbz	x2, <kiln_v2_matmul_q4+0x350>
	udiv	x3, x0, x2
	mov	x14, #0x0                   	// #0
	cmp	x14, x11
	b.lt	<kiln_v2_matmul_q4+0x38>  // b.tstop
	ret
	mov	x4, x10
	cmp	x4, x3
	b.lt	<kiln_v2_matmul_q4+0x4c>  // b.tstop
	add	x14, x14, #0x40
	b	<kiln_v2_matmul_q4+0x2c>
	add	x0, x14, #0x40
	cmp	x0, x11
	csel	x5, x0, x11, lt	// lt = tstop
	mov	x6, x14
	cmp	x6, x5
	b.lt	<kiln_v2_matmul_q4+0x6c>  // b.tstop
	add	x4, x4, #0x1
	b	<kiln_v2_matmul_q4+0x3c>
	mov	x7, #0x0                   	// #0
	movi	v30.16b, #0x0
	mov	x0, #0x90                  	// #144
	madd	x8, x6, x0, x15
	add	x0, x12, #0x100
	mov	x1, #0xc0                  	// #192
	madd	x9, x4, x1, x0
	mov	v0.16b, v30.16b
	cmp	x7, #0x2
	b.lt	<kiln_v2_matmul_q4+0x18c>  // b.tstop
	fneg	v2.4s, v0.4s
	mov	w0, #0x999a                	// #39322
	movk	w0, #0xc2ae, lsl #16
	dup	v4.4s, w0
	fcmgt	v1.4s, v4.4s, v2.4s
	mov	w0, #0x6967                	// #26983
	movk	w0, #0x3950, lsl #16
	dup	v3.4s, w0
	fmax	v2.4s, v2.4s, v4.4s
	mov	w0, #0x999a                	// #39322
	movk	w0, #0x42b0, lsl #16
	dup	v4.4s, w0
	fmin	v20.4s, v2.4s, v4.4s
	mov	w0, #0xaa3b                	// #43579
	movk	w0, #0x3fb8, lsl #16
	dup	v2.4s, w0
	fmul	v2.4s, v20.4s, v2.4s
	frintn	v2.4s, v2.4s
	mov	w0, #0x8083                	// #32899
	movk	w0, #0x395e, lsl #16
	dup	v4.4s, w0
	mov	w0, #0x8000                	// #32768
	movk	w0, #0xbf31, lsl #16
	dup	v5.4s, w0
	fmla	v20.4s, v2.4s, v5.4s
	fmla	v20.4s, v2.4s, v4.4s
	mov	w0, #0x43ce                	// #17358
	movk	w0, #0x3ab7, lsl #16
	dup	v4.4s, w0
	fmla	v4.4s, v3.4s, v20.4s
	mov	w0, #0x8908                	// #35080
	movk	w0, #0x3c08, lsl #16
	dup	v3.4s, w0
	fmla	v3.4s, v4.4s, v20.4s
	mov	w0, #0xa9c1                	// #43457
	movk	w0, #0x3d2a, lsl #16
	dup	v4.4s, w0
	fmla	v4.4s, v3.4s, v20.4s
	mov	w0, #0xaaaa                	// #43690
	movk	w0, #0x3e2a, lsl #16
	dup	v3.4s, w0
	fmla	v3.4s, v4.4s, v20.4s
	movi	v4.4s, #0x3f, lsl #24
	fmla	v4.4s, v3.4s, v20.4s
	fmul	v6.4s, v20.4s, v20.4s
	fmov	v3.4s, #1.000000000000000000e+00
	fadd	v5.4s, v20.4s, v3.4s
	fmla	v5.4s, v4.4s, v6.4s
	fcvtzs	v2.4s, v2.4s
	movi	v4.4s, #0x7f
	add	v2.4s, v2.4s, v4.4s
	shl	v2.4s, v2.4s, #23
	fmul	v2.4s, v5.4s, v2.4s
	bsl	v1.16b, v30.16b, v2.16b
	fadd	v1.4s, v1.4s, v3.4s
	fdiv	v0.4s, v0.4s, v1.4s
	add	x1, x15, #0x480
	lsl	x0, x6, #8
	add	x0, x0, x4, lsl #4
	str	q0, [x1, x0]
	add	x6, x6, #0x1
	b	<kiln_v2_matmul_q4+0x5c>
	add	x7, x7, #0x1
	ldr	q1, [x9, #16]
	ldr	s2, [x8, #4]
	ldr	q6, [x9, #32]
	movi	v3.16b, #0xf
	and	v5.16b, v6.16b, v3.16b
	uxtl	v7.8h, v5.8b
	ldur	q4, [x8, #8]
	smull	v16.4s, v7.4h, v4.4h
	smull2	v7.4s, v7.8h, v4.8h
	addp	v7.4s, v16.4s, v7.4s
	uxtl2	v16.8h, v5.16b
	ldur	q5, [x8, #24]
	smull	v17.4s, v16.4h, v5.4h
	smull2	v16.4s, v16.8h, v5.8h
	addp	v16.4s, v17.4s, v16.4s
	add	v7.4s, v7.4s, v16.4s
	ushr	v6.8h, v6.8h, #4
	and	v16.16b, v6.16b, v3.16b
	uxtl	v17.8h, v16.8b
	ldur	q6, [x8, #40]
	smull	v18.4s, v17.4h, v6.4h
	smull2	v17.4s, v17.8h, v6.8h
	addp	v17.4s, v18.4s, v17.4s
	add	v17.4s, v7.4s, v17.4s
	uxtl2	v16.8h, v16.16b
	ldur	q7, [x8, #56]
	smull	v18.4s, v16.4h, v7.4h
	smull2	v16.4s, v16.8h, v7.8h
	addp	v16.4s, v18.4s, v16.4s
	add	v16.4s, v17.4s, v16.4s
	ldr	q17, [x9, #48]
	and	v18.16b, v17.16b, v3.16b
	uxtl	v19.8h, v18.8b
	smull	v20.4s, v19.4h, v4.4h
	smull2	v19.4s, v19.8h, v4.8h
	addp	v19.4s, v20.4s, v19.4s
	uxtl2	v18.8h, v18.16b
	smull	v20.4s, v18.4h, v5.4h
	smull2	v18.4s, v18.8h, v5.8h
	addp	v18.4s, v20.4s, v18.4s
	add	v18.4s, v19.4s, v18.4s
	ushr	v17.8h, v17.8h, #4
	and	v17.16b, v17.16b, v3.16b
	uxtl	v19.8h, v17.8b
	smull	v20.4s, v19.4h, v6.4h
	smull2	v19.4s, v19.8h, v6.8h
	addp	v19.4s, v20.4s, v19.4s
	add	v18.4s, v18.4s, v19.4s
	uxtl2	v17.8h, v17.16b
	smull	v19.4s, v17.4h, v7.4h
	smull2	v17.4s, v17.8h, v7.8h
	addp	v17.4s, v19.4s, v17.4s
	add	v17.4s, v18.4s, v17.4s
	addp	v16.4s, v16.4s, v17.4s
	ldr	q17, [x9, #64]
	and	v18.16b, v17.16b, v3.16b
	uxtl	v19.8h, v18.8b
	smull	v20.4s, v19.4h, v4.4h
	smull2	v19.4s, v19.8h, v4.8h
	addp	v19.4s, v20.4s, v19.4s
	uxtl2	v18.8h, v18.16b
	smull	v20.4s, v18.4h, v5.4h
	smull2	v18.4s, v18.8h, v5.8h
	addp	v18.4s, v20.4s, v18.4s
	add	v18.4s, v19.4s, v18.4s
	ushr	v17.8h, v17.8h, #4
	and	v17.16b, v17.16b, v3.16b
	uxtl	v19.8h, v17.8b
	smull	v20.4s, v19.4h, v6.4h
	smull2	v19.4s, v19.8h, v6.8h
	addp	v19.4s, v20.4s, v19.4s
	add	v18.4s, v18.4s, v19.4s
	uxtl2	v17.8h, v17.16b
	smull	v19.4s, v17.4h, v7.4h
	smull2	v17.4s, v17.8h, v7.8h
	addp	v17.4s, v19.4s, v17.4s
	add	v17.4s, v18.4s, v17.4s
	ldr	q18, [x9, #80]
	and	v19.16b, v18.16b, v3.16b
	uxtl	v20.8h, v19.8b
	smull	v21.4s, v20.4h, v4.4h
	smull2	v4.4s, v20.8h, v4.8h
	addp	v4.4s, v21.4s, v4.4s
	uxtl2	v19.8h, v19.16b
	smull	v20.4s, v19.4h, v5.4h
	smull2	v5.4s, v19.8h, v5.8h
	addp	v5.4s, v20.4s, v5.4s
	add	v4.4s, v4.4s, v5.4s
	ushr	v5.8h, v18.8h, #4
	and	v3.16b, v5.16b, v3.16b
	uxtl	v5.8h, v3.8b
	smull	v18.4s, v5.4h, v6.4h
	smull2	v5.4s, v5.8h, v6.8h
	addp	v5.4s, v18.4s, v5.4s
	add	v4.4s, v4.4s, v5.4s
	uxtl2	v3.8h, v3.16b
	smull	v5.4s, v3.4h, v7.4h
	smull2	v3.4s, v3.8h, v7.8h
	addp	v3.4s, v5.4s, v3.4s
	add	v3.4s, v4.4s, v3.4s
	addp	v3.4s, v17.4s, v3.4s
	addp	v3.4s, v16.4s, v3.4s
	scvtf	v3.4s, v3.4s
	ldr	q4, [x9]
	ld1r	{v5.4s}, [x8]
	fmul	v4.4s, v4.4s, v5.4s
	fmla	v0.4s, v3.4s, v4.4s
	fmla	v0.4s, v1.4s, v2.s[0]
	add	x8, x8, #0x48
	add	x9, x9, #0x60
	b	<kiln_v2_matmul_q4+0x8c>
	udf	#49439
	udf	#49439

<kiln_v3_matmul_q8>:
	ldr	x13, [x0]
	ldr	x14, [x0, #8]
	ldr	x15, [x0, #32]
	lsl	x0, x1, #4
	cbz	x2, <kiln_v3_matmul_q8+0x244>
	udiv	x0, x0, x2
	add	x1, x1, #0x1
	lsl	x1, x1, #4
	cbz	x2, <kiln_v3_matmul_q8+0x248>
	udiv	x1, x1, x2
	mov	x2, #0x0                   	// #0
	cmp	x2, x15
	b.lt	<kiln_v3_matmul_q8+0x38>  // b.tstop
	ret
	mov	x3, x0
	cmp	x3, x1
	b.lt	<kiln_v3_matmul_q8+0x4c>  // b.tstop
	add	x2, x2, #0x40
	b	<kiln_v3_matmul_q8+0x2c>
	add	x4, x2, #0x40
	cmp	x4, x15
	csel	x4, x4, x15, lt	// lt = tstop
	mov	x5, x2
	cmp	x5, x4
	b.lt	<kiln_v3_matmul_q8+0x6c>  // b.tstop
	add	x3, x3, #0x1
	b	<kiln_v3_matmul_q8+0x3c>
	mov	x6, #0x0                   	// #0
	movi	v0.16b, #0x0
	mov	x7, #0x90                  	// #144
	madd	x7, x5, x7, x13
	add	x8, x14, #0xd00
	mov	x9, #0x120                 	// #288
	madd	x8, x3, x9, x8
	cmp	x6, #0x2
	b.lt	<kiln_v3_matmul_q8+0xb4>  // b.tstop
	add	x7, x13, #0x480
	lsl	x6, x5, #8
	add	x6, x6, x3, lsl #4
	ldr	q31, [x7, x6]
	fmul	v31.4s, v0.4s, v31.4s
	add	x7, x13, #0xc80
	str	q31, [x7, x6]
	add	x5, x5, #0x1
	b	<kiln_v3_matmul_q8+0x5c>
	add	x6, x6, #0x1
	ldr	q2, [x8, #16]
	sxtl	v3.8h, v2.8b
	ldur	q1, [x7, #8]
	smull	v4.4s, v3.4h, v1.4h
	smull2	v3.4s, v3.8h, v1.8h
	addp	v3.4s, v4.4s, v3.4s
	sxtl2	v4.8h, v2.16b
	ldur	q2, [x7, #24]
	smull	v5.4s, v4.4h, v2.4h
	smull2	v4.4s, v4.8h, v2.8h
	addp	v4.4s, v5.4s, v4.4s
	add	v4.4s, v3.4s, v4.4s
	ldr	q5, [x8, #32]
	sxtl	v6.8h, v5.8b
	ldur	q3, [x7, #40]
	smull	v7.4s, v6.4h, v3.4h
	smull2	v6.4s, v6.8h, v3.8h
	addp	v6.4s, v7.4s, v6.4s
	add	v6.4s, v4.4s, v6.4s
	sxtl2	v5.8h, v5.16b
	ldur	q4, [x7, #56]
	smull	v7.4s, v5.4h, v4.4h
	smull2	v5.4s, v5.8h, v4.8h
	addp	v5.4s, v7.4s, v5.4s
	add	v5.4s, v6.4s, v5.4s
	ldr	q6, [x8, #48]
	sxtl	v7.8h, v6.8b
	smull	v16.4s, v7.4h, v1.4h
	smull2	v7.4s, v7.8h, v1.8h
	addp	v7.4s, v16.4s, v7.4s
	sxtl2	v6.8h, v6.16b
	smull	v16.4s, v6.4h, v2.4h
	smull2	v6.4s, v6.8h, v2.8h
	addp	v6.4s, v16.4s, v6.4s
	add	v6.4s, v7.4s, v6.4s
	ldr	q7, [x8, #64]
	sxtl	v16.8h, v7.8b
	smull	v17.4s, v16.4h, v3.4h
	smull2	v16.4s, v16.8h, v3.8h
	addp	v16.4s, v17.4s, v16.4s
	add	v6.4s, v6.4s, v16.4s
	sxtl2	v7.8h, v7.16b
	smull	v16.4s, v7.4h, v4.4h
	smull2	v7.4s, v7.8h, v4.8h
	addp	v7.4s, v16.4s, v7.4s
	add	v6.4s, v6.4s, v7.4s
	addp	v5.4s, v5.4s, v6.4s
	ldr	q6, [x8, #80]
	sxtl	v7.8h, v6.8b
	smull	v16.4s, v7.4h, v1.4h
	smull2	v7.4s, v7.8h, v1.8h
	addp	v7.4s, v16.4s, v7.4s
	sxtl2	v6.8h, v6.16b
	smull	v16.4s, v6.4h, v2.4h
	smull2	v6.4s, v6.8h, v2.8h
	addp	v6.4s, v16.4s, v6.4s
	add	v6.4s, v7.4s, v6.4s
	ldr	q7, [x8, #96]
	sxtl	v16.8h, v7.8b
	smull	v17.4s, v16.4h, v3.4h
	smull2	v16.4s, v16.8h, v3.8h
	addp	v16.4s, v17.4s, v16.4s
	add	v6.4s, v6.4s, v16.4s
	sxtl2	v7.8h, v7.16b
	smull	v16.4s, v7.4h, v4.4h
	smull2	v7.4s, v7.8h, v4.8h
	addp	v7.4s, v16.4s, v7.4s
	add	v6.4s, v6.4s, v7.4s
	ldr	q7, [x8, #112]
	sxtl	v16.8h, v7.8b
	smull	v17.4s, v16.4h, v1.4h
	smull2	v1.4s, v16.8h, v1.8h
	addp	v1.4s, v17.4s, v1.4s
	sxtl2	v7.8h, v7.16b
	smull	v16.4s, v7.4h, v2.4h
	smull2	v2.4s, v7.8h, v2.8h
	addp	v2.4s, v16.4s, v2.4s
	add	v1.4s, v1.4s, v2.4s
	ldr	q2, [x8, #128]
	sxtl	v7.8h, v2.8b
	smull	v16.4s, v7.4h, v3.4h
	smull2	v3.4s, v7.8h, v3.8h
	addp	v3.4s, v16.4s, v3.4s
	add	v1.4s, v1.4s, v3.4s
	sxtl2	v2.8h, v2.16b
	smull	v3.4s, v2.4h, v4.4h
	smull2	v2.4s, v2.8h, v4.8h
	addp	v2.4s, v3.4s, v2.4s
	add	v1.4s, v1.4s, v2.4s
	addp	v1.4s, v6.4s, v1.4s
	addp	v1.4s, v5.4s, v1.4s
	scvtf	v1.4s, v1.4s
	ldr	q2, [x8]
	ld1r	{v3.4s}, [x7]
	fmul	v2.4s, v2.4s, v3.4s
	fmla	v0.4s, v1.4s, v2.4s
	add	x7, x7, #0x48
	add	x8, x8, #0x90
	b	<kiln_v3_matmul_q8+0x88>
	udf	#49439
	udf	#49439

<kiln_v4_rope>:
	ldr	x12, [x0]
	ldr	x11, [x0, #8]
	ldr	x9, [x0, #40]
	ldr	x3, [x0, #32]
	mul	x0, x3, x1
	cbz	x2, <kiln_v4_rope+0xf0>
	udiv	x10, x0, x2
	add	x0, x1, #0x1
	mul	x0, x3, x0
	cbz	x2, <kiln_v4_rope+0xf4>
	udiv	x3, x0, x2
	cmp	x10, x3
	b.lt	<kiln_v4_rope+0x38>  // b.tstop
	ret
	mov	x4, #0x0                   	// #0
	cmp	x4, #0x4
	b.lt	<kiln_v4_rope+0x4c>  // b.tstop
	add	x10, x10, #0x1
	b	<kiln_v4_rope+0x2c>
	add	x0, x12, #0xc80
	add	x0, x0, x10, lsl #8
	lsl	x8, x4, #6
	add	x5, x0, x4, lsl #6
	ldr	q0, [x0, x8]
	mov	x0, #0x1f00                	// #7936
	add	x1, x11, x0
	add	x0, x9, x10
	lsl	x2, x0, #7
	add	x6, x1, x0, lsl #7
	ldr	q1, [x1, x2]
	rev64	v2.4s, v0.4s
	ldr	q3, [x6, #64]
	fmul	v2.4s, v2.4s, v3.4s
	fmla	v2.4s, v0.4s, v1.4s
	add	x0, x12, x10, lsl #8
	add	x7, x0, x4, lsl #6
	str	q2, [x0, x8]
	ldr	q0, [x5, #16]
	ldr	q1, [x6, #16]
	rev64	v2.4s, v0.4s
	ldr	q3, [x6, #80]
	fmul	v2.4s, v2.4s, v3.4s
	fmla	v2.4s, v0.4s, v1.4s
	str	q2, [x7, #16]
	ldr	q1, [x5, #32]
	ldr	q2, [x6, #32]
	rev64	v3.4s, v1.4s
	ldr	q4, [x6, #96]
	fmul	v0.4s, v3.4s, v4.4s
	fmla	v0.4s, v1.4s, v2.4s
	str	q0, [x7, #32]
	ldr	q2, [x5, #48]
	ldr	q3, [x6, #48]
	rev64	v4.4s, v2.4s
	ldr	q5, [x6, #112]
	fmul	v1.4s, v4.4s, v5.4s
	fmla	v1.4s, v2.4s, v3.4s
	str	q1, [x7, #48]
	add	x4, x4, #0x1
	b	<kiln_v4_rope+0x3c>
	udf	#49439
	udf	#49439

<kiln_v5_kv_store>:
	ldr	x11, [x0]
	ldr	x9, [x0, #16]
	ldr	x8, [x0, #40]
	ldr	x3, [x0, #32]
	mul	x0, x3, x1
	cbz	x2, <kiln_v5_kv_store+0x11c>
	udiv	x10, x0, x2
	add	x0, x1, #0x1
	mul	x0, x3, x0
	cbz	x2, <kiln_v5_kv_store+0x120>
	udiv	x3, x0, x2
	cmp	x10, x3
	b.lt	<kiln_v5_kv_store+0x38>  // b.tstop
	ret
	lsl	x0, x10, #8
	add	x6, x11, x10, lsl #8
	ldr	q0, [x11, x0]
	add	x4, x8, x10
	lsl	x5, x4, #8
	add	x7, x9, x4, lsl #8
	str	q0, [x9, x5]
	ldr	q1, [x6, #16]
	str	q1, [x7, #16]
	ldr	q2, [x6, #32]
	str	q2, [x7, #32]
	ldr	q3, [x6, #48]
	str	q3, [x7, #48]
	ldr	q4, [x6, #64]
	str	q4, [x7, #64]
	ldr	q5, [x6, #80]
	str	q5, [x7, #80]
	ldr	q6, [x6, #96]
	str	q6, [x7, #96]
	ldr	q7, [x6, #112]
	str	q7, [x7, #112]
	ldr	q16, [x6, #128]
	str	q16, [x7, #128]
	ldr	q17, [x6, #144]
	str	q17, [x7, #144]
	ldr	q18, [x6, #160]
	str	q18, [x7, #160]
	ldr	q19, [x6, #176]
	str	q19, [x7, #176]
	ldr	q20, [x6, #192]
	str	q20, [x7, #192]
	ldr	q21, [x6, #208]
	str	q21, [x7, #208]
	ldr	q22, [x6, #224]
	str	q22, [x7, #224]
	ldr	q23, [x6, #240]
	str	q23, [x7, #240]
	add	x0, x9, #0x4, lsl #12
	add	x4, x0, x4, lsl #8
	str	q0, [x0, x5]
	str	q1, [x4, #16]
	str	q2, [x4, #32]
	str	q3, [x4, #48]
	str	q4, [x4, #64]
	str	q5, [x4, #80]
	str	q6, [x4, #96]
	str	q7, [x4, #112]
	str	q16, [x4, #128]
	str	q17, [x4, #144]
	str	q18, [x4, #160]
	str	q19, [x4, #176]
	str	q20, [x4, #192]
	str	q21, [x4, #208]
	str	q22, [x4, #224]
	str	q23, [x4, #240]
	add	x10, x10, #0x1
	b	<kiln_v5_kv_store+0x2c>
	udf	#49439
	udf	#49439

<kiln_v5_attend>:
	stp	x29, x30, [sp, #-16]!
	mov	x29, sp
	str	x19, [sp, #-16]!
	sub	sp, sp, #0x110
	mov	x6, x1
	ldr	x19, [x0]
	ldr	x1, [x0, #24]
	ldr	x11, [x0, #16]
	ldr	x3, [x0, #40]
	ldr	x4, [x0, #32]
	ldr	x5, [x0, #48]
	sub	x0, x4, x5
	lsl	x0, x0, #2
	mul	x4, x0, x6
	cbz	x2, <kiln_v5_attend+0x2f4>
	udiv	x4, x4, x2
	add	x6, x6, #0x1
	mul	x0, x0, x6
	cbz	x2, <kiln_v5_attend+0x2f8>
	udiv	x0, x0, x2
	add	x4, x4, x5, lsl #2
	add	x5, x0, x5, lsl #2
	cmp	x4, x5
	b.lt	<kiln_v5_attend+0x70>  // b.tstop
	add	sp, sp, #0x110
	ldr	x19, [sp], #16
	ldp	x29, x30, [sp], #16
	ret
	mov	x8, #0x0                   	// #0
	mvni	v29.4s, #0x7f, msl #16
	lsr	x6, x4, #2
	add	x10, x3, x6
	add	x7, x10, #0x1
	cmp	x8, x7
	b.lt	<kiln_v5_attend+0x26c>  // b.tstop
	mov	w0, #0xff800000            	// #-8388608
	fmov	s0, w0
	mov	x8, sp
	add	x0, x8, x7, lsl #2
	str	s0, [x8, x7, lsl #2]
	str	s0, [x0, #4]
	str	s0, [x0, #8]
	mov	x9, #0x0                   	// #0
	movi	v0.16b, #0x0
	add	x0, x10, #0x4
	lsr	x10, x0, #2
	mov	v1.16b, v0.16b
	cmp	x9, x10
	b.lt	<kiln_v5_attend+0x180>  // b.tstop
	mov	x2, #0x0                   	// #0
	mov	v2.16b, v0.16b
	mov	v3.16b, v0.16b
	mov	v4.16b, v0.16b
	cmp	x2, x7
	b.lt	<kiln_v5_attend+0x13c>  // b.tstop
	fmov	s5, #1.000000000000000000e+00
	mov	s6, v1.s[1]
	fadd	s6, s1, s6
	mov	s7, v1.s[2]
	mov	s1, v1.s[3]
	fadd	s1, s7, s1
	fadd	s1, s6, s1
	fdiv	s1, s5, s1
	dup	v1.4s, v1.s[0]
	fmul	v0.4s, v0.4s, v1.4s
	ldr	x0, [x1, #8]
	add	x0, x0, x6, lsl #8
	and	x2, x4, #0x3
	lsl	x6, x2, #6
	add	x2, x0, x2, lsl #6
	str	q0, [x0, x6]
	fmul	v4.4s, v4.4s, v1.4s
	str	q4, [x2, #16]
	fmul	v3.4s, v3.4s, v1.4s
	str	q3, [x2, #32]
	fmul	v3.4s, v2.4s, v1.4s
	str	q3, [x2, #48]
	add	x4, x4, #0x1
	b	<kiln_v5_attend+0x58>
	ldr	s5, [x8, x2, lsl #2]
	add	x9, x2, #0x1
	add	x10, x11, #0x4, lsl #12
	and	x12, x4, #0x3
	add	x12, x10, x12, lsl #6
	lsl	x13, x2, #8
	add	x10, x12, x2, lsl #8
	ldr	q6, [x12, x13]
	fmla	v0.4s, v6.4s, v5.s[0]
	ldr	q6, [x10, #16]
	fmla	v4.4s, v6.4s, v5.s[0]
	ldr	q6, [x10, #32]
	fmla	v3.4s, v6.4s, v5.s[0]
	ldr	q6, [x10, #48]
	fmla	v2.4s, v6.4s, v5.s[0]
	mov	x2, x9
	b	<kiln_v5_attend+0xd4>
	ldr	q6, [x8, x9, lsl #4]
	fsub	v6.4s, v6.4s, v29.4s
	mov	w12, #0x999a                	// #39322
	movk	w12, #0xc2ae, lsl #16
	dup	v17.4s, w12
	fcmgt	v20.4s, v17.4s, v6.4s
	mov	w12, #0x6967                	// #26983
	movk	w12, #0x3950, lsl #16
	dup	v16.4s, w12
	fmax	v6.4s, v6.4s, v17.4s
	mov	w12, #0x999a                	// #39322
	movk	w12, #0x42b0, lsl #16
	dup	v17.4s, w12
	fmin	v2.4s, v6.4s, v17.4s
	mov	w12, #0xaa3b                	// #43579
	movk	w12, #0x3fb8, lsl #16
	dup	v17.4s, w12
	fmul	v6.4s, v2.4s, v17.4s
	frintn	v6.4s, v6.4s
	mov	w12, #0x8083                	// #32899
	movk	w12, #0x395e, lsl #16
	dup	v17.4s, w12
	mov	w12, #0x8000                	// #32768
	movk	w12, #0xbf31, lsl #16
	dup	v18.4s, w12
	fmla	v2.4s, v6.4s, v18.4s
	fmla	v2.4s, v6.4s, v17.4s
	mov	w12, #0x43ce                	// #17358
	movk	w12, #0x3ab7, lsl #16
	dup	v5.4s, w12
	fmla	v5.4s, v16.4s, v2.4s
	mov	w12, #0x8908                	// #35080
	movk	w12, #0x3c08, lsl #16
	dup	v7.4s, w12
	fmla	v7.4s, v5.4s, v2.4s
	mov	w12, #0xa9c1                	// #43457
	movk	w12, #0x3d2a, lsl #16
	dup	v5.4s, w12
	fmla	v5.4s, v7.4s, v2.4s
	mov	w12, #0xaaaa                	// #43690
	movk	w12, #0x3e2a, lsl #16
	dup	v7.4s, w12
	fmla	v7.4s, v5.4s, v2.4s
	movi	v5.4s, #0x3f, lsl #24
	fmla	v5.4s, v7.4s, v2.4s
	fmul	v16.4s, v2.4s, v2.4s
	fmov	v7.4s, #1.000000000000000000e+00
	fadd	v7.4s, v2.4s, v7.4s
	fmla	v7.4s, v5.4s, v16.4s
	fcvtzs	v6.4s, v6.4s
	movi	v16.4s, #0x7f
	add	v6.4s, v6.4s, v16.4s
	shl	v6.4s, v6.4s, #23
	fmul	v6.4s, v7.4s, v6.4s
	bsl	v20.16b, v0.16b, v6.16b
	str	q20, [x8, x9, lsl #4]
	add	x9, x9, #0x1
	fadd	v1.4s, v1.4s, v20.4s
	b	<kiln_v5_attend+0xbc>
	add	x9, x19, x6, lsl #8
	and	x13, x4, #0x3
	lsl	x12, x13, #6
	add	x14, x9, x13, lsl #6
	ldr	q16, [x14, #48]
	add	x13, x11, x13, lsl #6
	lsl	x15, x8, #8
	add	x0, x13, x8, lsl #8
	ldr	q17, [x0, #48]
	ldr	q18, [x14, #32]
	ldr	q19, [x0, #32]
	ldr	q20, [x14, #16]
	ldr	q21, [x0, #16]
	ldr	q22, [x9, x12]
	ldr	q23, [x13, x15]
	movi	v4.16b, #0x0
	fmla	v4.4s, v22.4s, v23.4s
	fmla	v4.4s, v20.4s, v21.4s
	fmla	v4.4s, v18.4s, v19.4s
	fmla	v4.4s, v16.4s, v17.4s
	mov	s16, v4.s[1]
	fadd	s16, s4, s16
	mov	s17, v4.s[2]
	mov	s18, v4.s[3]
	fadd	s17, s17, s18
	fadd	s16, s16, s17
	dup	v16.4s, v16.s[0]
	fmov	v17.4s, #2.500000000000000000e-01
	fmul	v16.4s, v16.4s, v17.4s
	mov	x9, sp
	str	s16, [x9, x8, lsl #2]
	add	x8, x8, #0x1
	fmax	v29.4s, v29.4s, v16.4s
	b	<kiln_v5_attend+0x84>
	udf	#49439
	udf	#49439

<kiln_run>:
	stp	x29, x30, [sp, #-16]!
	mov	x29, sp
	stp	x21, x25, [sp, #-16]!
	mov	x21, x0
	ldr	x3, [x0, #56]
	ldr	x0, [x0, #64]
	adrp	x1, <kiln_v1_rms_norm_norm>
	ldr	x1, [x1]
	mov	x2, x21
	blr	x3
	mov	x25, x21
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v2_matmul_q4>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v3_matmul_q8>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v4_rope>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v5_kv_store>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldr	x3, [x25, #56]
	ldr	x0, [x25, #64]
	adrp	x1, <kiln_v5_attend>
	ldr	x1, [x1]
	mov	x2, x25
	blr	x3
	ldp	x21, x25, [sp], #16
	ldp	x29, x30, [sp], #16
	ret
